"""tfhybrid.priors"""
