"""Retrieval metrics, the evaluation protocol and the `terrahash eval` command."""
