"""tfhybrid.inference"""
