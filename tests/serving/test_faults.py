"""Fault drill: a multi-node Ray cluster on this machine loses a node holding shard replicas while at
least 500 HTTP queries run; no query may fail, every answer must equal the unsharded one, and the lost
replicas must come back.

The drill runs in a subprocess (``python -m tests.serving.test_faults ARGS_JSON``), because it needs a
Ray cluster of its own (ray.cluster_utils.Cluster) and the test session already runs a local Ray.
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
QUERIES = 520
KILL_AFTER = 120  # queries answered before the node is killed
SHARDS, BITS, ROWS = 2, 16, 400


def test_losing_a_node_fails_no_query_and_the_replicas_come_back(model_dir, tmp_path):
    pytest.importorskip("ray.serve")
    from serving.index import build_index

    codes = np.random.default_rng(0).integers(0, 256, size=(ROWS, BITS // 8), dtype=np.uint8)
    ids = [f"scene/{i:04d}.jpg" for i in range(ROWS)]
    build_index(codes, ids, BITS, SHARDS, str(tmp_path), model_version="tiny",
                extra={"model_dir": str(model_dir), "image_root": ""})
    args = json.dumps({"index": str(tmp_path)})
    result = subprocess.run([sys.executable, "-m", "tests.serving.test_faults", args], cwd=REPO,
                            capture_output=True, text=True, timeout=420)
    lines = [line for line in result.stdout.splitlines() if line.startswith("DRILL ")]
    assert result.returncode == 0 and lines, result.stdout[-3000:] + result.stderr[-5000:]
    report = json.loads(lines[-1][len("DRILL "):])
    assert report["sent"] >= 500
    assert report["failed"] == [], report["failed"][:5]
    assert report["wrong"] == [], report["wrong"][:5]
    assert report["killed_node_replicas"] >= 1  # the node lost did hold shard replicas
    assert report["recovered"], report["status"]


# --- the drill (runs in the subprocess) -----------------------------------------------------------------


def _expected(index_root: str) -> dict[str, list]:
    """(distance, id) top-10 of every id's similar query, from one unsharded flat index (itself left out)."""
    from serving.index import Shard, load_index

    index = load_index(index_root)
    codes = np.concatenate([s.codes for s in index.shards])
    rows = np.concatenate([s.rows for s in index.shards])
    order = np.argsort(rows)
    flat = Shard(codes[order], rows[order], index.manifest["bits"], ids=index.ids(rows[order]))
    distances, found = flat.search(flat.codes, 11)
    out = {}
    for q, item in enumerate(flat.ids):
        pairs = [[int(d), str(flat.ids[p])] for d, p in zip(distances[q], found[q]) if flat.ids[p] != item]
        out[str(item)] = pairs[:10]
    return out


def _replica_nodes(app: str) -> dict[str, int]:
    """Alive shard replica actors per node id."""
    from ray.util.state import list_actors

    counts: dict[str, int] = {}
    for actor in list_actors(filters=[("state", "=", "ALIVE")], limit=1000):
        if actor.class_name.startswith(f"ServeReplica:{app}:images-shard"):
            counts[actor.node_id] = counts.get(actor.node_id, 0) + 1
    return counts


def _shard_status(app: str) -> dict:
    from ray import serve

    deployments = serve.status().applications[app].deployments
    return {name: {"status": str(d.status), "replicas": {str(k): v for k, v in d.replica_states.items()}}
            for name, d in deployments.items() if name.startswith("images-shard")}


def _recovered(status: dict, replicas: int) -> bool:
    return all(s["status"].endswith("HEALTHY") and s["replicas"].get("RUNNING", 0) == replicas
               for s in status.values())


def drill(index_root: str) -> dict:
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from serving.app import ServeSettings, build_app
    from tests.conftest import free_port

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"head": 10}})
    workers = [cluster.add_node(num_cpus=1, resources={"shard_slot": 10}) for _ in range(2)]
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    port = free_port()
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    settings = ServeSettings(index=index_root, shard_replicas=2, spread_shards=True, shard_num_cpus=0.1,
                             encoder_num_cpus=0.1, router_num_cpus=0.1, router_resources={"head": 0.01},
                             encoder_resources={"head": 0.01}, shard_resources={"shard_slot": 0.01},
                             shard_retries=4, shard_timeout_s=1.0, deadline_s=8.0)
    serve.run(build_app(settings), name="drill", route_prefix="/")
    expected = _expected(index_root)
    ids = sorted(expected)
    url = f"http://127.0.0.1:{port}/v1/search/similar/"
    failed, wrong, answered = [], [], [0]

    def loop():
        for n in range(QUERIES):
            item = ids[n % len(ids)]
            try:
                with urllib.request.urlopen(url + item + "?k=10", timeout=15) as answer:
                    body = json.loads(answer.read())
                got = [[h["distance"], h["id"]] for h in body["results"]]
                if got != expected[item]:
                    wrong.append({"id": item, "got": got, "want": expected[item]})
            except Exception as err:  # every kind of failure is what the drill counts
                failed.append(f"{n}: {type(err).__name__}: {err}")
            answered[0] += 1

    before = _replica_nodes("drill")
    thread = threading.Thread(target=loop)
    thread.start()
    while answered[0] < KILL_AFTER and thread.is_alive():
        time.sleep(0.05)
    victim = workers[0]
    cluster.remove_node(victim, allow_graceful=False)  # abrupt: its raylet and every replica on it die
    thread.join()
    deadline = time.monotonic() + 120
    status = _shard_status("drill")
    while not _recovered(status, 2) and time.monotonic() < deadline:
        if len(cluster.list_all_nodes()) < 3:
            cluster.add_node(num_cpus=1, resources={"shard_slot": 10})  # a replacement node for the lost replicas
        time.sleep(1)
        status = _shard_status("drill")
    after = _replica_nodes("drill")
    report = {"sent": answered[0], "failed": failed, "wrong": wrong,
              "killed_node_replicas": before.get(victim.node_id, 0), "recovered": _recovered(status, 2),
              "status": status, "replicas_per_node_before": before, "replicas_per_node_after": after}
    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()
    return report


if __name__ == "__main__":
    print("DRILL " + json.dumps(drill(json.loads(sys.argv[1])["index"])), flush=True)
