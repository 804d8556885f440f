"""tfhybrid.data"""
