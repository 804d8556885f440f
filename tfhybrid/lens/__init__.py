"""tfhybrid.lens"""
