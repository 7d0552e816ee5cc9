"""`terrahash cluster up|status|down`: a real multi-node Ray cluster on one machine, token authentication on."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cluster.cli.main import main
from cluster.local_cluster import ClusterState, client_env

pytest.importorskip("ray")


def _on_node(address: str, resource: str) -> str:
    """The node id a task that needs ``resource`` ran on (from a separate driver process)."""
    code = ("import ray; ray.init(address=%r, log_to_driver=False, configure_logging=False, logging_level='ERROR');"
            "f = ray.remote(resources={%r: 1})(lambda: ray.get_runtime_context().get_node_id());"
            "print(ray.get(f.remote()))") % (address, resource)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=client_env(), timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


def test_up_starts_three_nodes_each_its_own_raylet(local_cluster, capsys, monkeypatch):
    monkeypatch.setenv("TERRAHASH_HOME", os.environ["TERRAHASH_HOME"])
    assert main(["cluster", "status", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    nodes = {n["node"]: n for n in status["nodes"]}
    assert sorted(nodes) == ["head", "worker 1", "worker 2"] and all(n["alive"] and n["cpus"] == 1 for n in nodes.values())
    assert len({n["node_id"] for n in nodes.values()}) == 3
    assert _on_node(status["address"], "terrahash-node-2") == nodes["worker 2"]["node_id"]
    assert main(["cluster", "status"]) == 0 and "worker 2" in capsys.readouterr().out


def test_token_authentication_is_on(local_cluster):
    from ray.job_submission import JobSubmissionClient

    url = local_cluster["dashboard_url"]
    with pytest.raises(Exception, match="401|403|nauthori|uthentication"):
        JobSubmissionClient(url, headers={"Authorization": "Bearer not-the-token"}).list_jobs()
    token = subprocess.run(["ray", "get-auth-token"], capture_output=True, text=True, env=client_env(),
                           check=True).stdout.strip()
    assert JobSubmissionClient(url, headers={"Authorization": f"Bearer {token}"}).list_jobs() is not None


def test_down_stops_only_its_own_cluster(tmp_path, monkeypatch, capsys, local_ray, local_cluster):
    """A second cluster, brought up and down: its processes are gone, the session's own Ray still runs."""
    monkeypatch.setenv("TERRAHASH_HOME", str(tmp_path))
    assert main(["cluster", "up", "--workers", "1", "--cpus-per-node", "1"]) == 0
    state = ClusterState.load()
    assert main(["cluster", "up", "--workers", "1"]) == 2  # one at a time
    assert main(["cluster", "down"]) == 0 and "down" in capsys.readouterr().out
    from cluster.local_cluster import alive

    assert not alive(state) and not (tmp_path / "cluster.json").exists()
    assert alive(ClusterState(**local_cluster))  # the other local cluster
    assert main(["cluster", "status"]) == 2  # none recorded
    assert local_ray.get(local_ray.remote(lambda: 1).remote()) == 1
