"""Fixtures the cluster tests share with the serving tests: the tiny exported students."""
from tests.serving.conftest import model_dir  # noqa: F401  (a fixture, found by pytest through this import)


import json  # noqa: E402

import pytest  # noqa: E402


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


from tests.serving.conftest import built_index, ucm_many  # noqa: E402,F401  (fixtures)
