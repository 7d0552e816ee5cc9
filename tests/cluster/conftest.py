"""Fixtures of the cluster tests: a real multi-node Ray cluster on this machine."""
import json

import pytest


@pytest.fixture(scope="session")
def local_cluster(tmp_path_factory):
    """A real 3-node Ray cluster on this machine, started by `terrahash cluster up` (its state under a
    TERRAHASH_HOME of its own) and stopped by `terrahash cluster down` at the end of the session."""
    from cluster.cli.main import main

    home = tmp_path_factory.mktemp("terrahash_home")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TERRAHASH_HOME", str(home))
        assert main(["cluster", "up", "--workers", "2", "--cpus-per-node", "1"]) == 0
        try:
            yield json.loads((home / "cluster.json").read_text())
        finally:
            main(["cluster", "down"])

