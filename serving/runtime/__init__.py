"""serving/runtime"""
