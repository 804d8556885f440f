"""tfhybrid.deblend"""
