"""The ``terrahash`` command: one module per command family, wired together in cluster.cli.main."""
