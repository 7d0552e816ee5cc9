"""Sharded faiss binary indexes: versions and releases on an artifact root, item metadata, encryption, drift."""
