"""serving/ingest"""
