"""Fixtures the cluster tests share with the serving tests: the tiny exported students."""
from tests.serving.conftest import model_dir  # noqa: F401  (a fixture, found by pytest through this import)
