"""tfhybrid.physics"""
