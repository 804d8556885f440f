"""tfhybrid.plotting"""
