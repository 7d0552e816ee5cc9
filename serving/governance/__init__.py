"""serving/governance"""
