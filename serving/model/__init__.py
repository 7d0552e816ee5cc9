"""serving/model"""
