"""`serve deploy` of the Serve config `terrahash serve --render` writes, onto the 3-node cluster `terrahash cluster up`
started: the app answers queries over HTTP, its shards spread over the nodes (cluster/README.md's recipe, run)."""
from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
from pathlib import Path

import pytest
import yaml

from cluster.cli.main import main
from cluster.local_cluster import client_env
from tests.conftest import free_port
from tests.serving.test_app import post_json

pytest.importorskip("ray.serve")
pytest.importorskip("onnxruntime")


def test_serve_deploy_of_the_rendered_config_answers_on_the_cluster(local_cluster, built_index, tmp_path):
    port = free_port()
    settings = {"index": str(built_index["root"]), "shard_replicas": 2, "spread_shards": True,
                "shard_num_cpus": 0.05, "encoder_num_cpus": 0.2, "router_num_cpus": 0.1,
                "shard_cache_dir": str(tmp_path / "shards")}
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(settings))
    deploy = tmp_path / "deploy.yaml"
    assert main(["serve", "--config", str(tmp_path / "serve.yaml"), "--render", str(deploy), "--host", "127.0.0.1",
                 "--port", str(port), "--proxy-location", "HeadOnly"]) == 0
    url = local_cluster["dashboard_url"]
    serve = [str(Path(sys.executable).parent / "serve")]
    try:
        subprocess.run([*serve, "deploy", str(deploy), "-a", url], check=True, env=client_env(), timeout=120,
                       capture_output=True)
        deadline, status = time.monotonic() + 240, None
        while time.monotonic() < deadline:
            try:
                status, body = post_json(f"http://127.0.0.1:{port}/v1/search/text", {"query": "a beach", "k": 5})
            except (urllib.error.URLError, OSError):
                status = None
            if status == 200:
                break
            time.sleep(1)
        assert status == 200 and len(body["results"]) == 5, body
        from tests.serving.test_app import call

        deadline = time.monotonic() + 120
        while True:  # every shard held by two replicas, one per node (spread_shards)
            status, ready = call(f"http://127.0.0.1:{port}/v1/readyz")
            nodes = {r["node"] for r in ready.get("replicas", [])} if isinstance(ready, dict) else set()
            if status == 200 and len(nodes) >= 2 or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert status == 200 and len(nodes) >= 2, ready
        ready = subprocess.run([*serve, "status", "-a", url], check=True, env=client_env(), timeout=60,
                               capture_output=True, text=True).stdout
        assert "RUNNING" in ready
    finally:
        subprocess.run([*serve, "shutdown", "-a", url, "-y"], env=client_env(), timeout=120, capture_output=True)
