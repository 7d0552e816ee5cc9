"""serving/index"""
