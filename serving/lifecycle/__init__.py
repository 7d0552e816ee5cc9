"""serving/lifecycle"""
