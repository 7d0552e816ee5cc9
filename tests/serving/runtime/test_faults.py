"""Fault drills on a multi-node Ray cluster on this machine, each while at least 500 HTTP queries run:

* a node holding shard replicas is lost: no query may fail, every answer must equal the unsharded one,
  and the lost replicas must come back;
* one node's local copy of a shard is corrupt: that replica is refused and replaced, no query fails,
  and readiness names the bad replica, its node and why, then reports the group healed.

The drills run in one subprocess (``python -m tests.serving.runtime.test_faults ARGS_JSON``), because they need a
Ray cluster of their own (ray.cluster_utils.Cluster) and the test session already runs a local Ray.
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

REPO = Path(__file__).resolve().parents[3]
QUERIES = 520
KILL_AFTER = 120  # queries answered before the node is killed
SHARDS, BITS, ROWS = 2, 16, 400


@pytest.fixture(scope="module")
def drills(model_dir, tmp_path_factory) -> dict:
    """The reports of both drills, run once in a subprocess over a random 2-shard index."""
    pytest.importorskip("ray.serve")
    from serving.index.releases import publish_release
    from serving.index.versions import build_index

    root = tmp_path_factory.mktemp("drill_index")
    codes = np.random.default_rng(0).integers(0, 256, size=(ROWS, BITS // 8), dtype=np.uint8)
    ids = [f"scene/{i:04d}.jpg" for i in range(ROWS)]
    manifest = build_index(codes, ids, BITS, SHARDS, str(root), model_version="tiny",
                           extra={"model_dir": str(model_dir), "image_root": ""})
    publish_release(str(root), {"images": manifest})
    args = json.dumps({"index": str(root), "cache": str(tmp_path_factory.mktemp("drill_cache"))})
    result = subprocess.run([sys.executable, "-m", "tests.serving.runtime.test_faults", args], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    lines = [line for line in result.stdout.splitlines() if line.startswith("DRILL ")]
    assert result.returncode == 0 and lines, result.stdout[-3000:] + result.stderr[-5000:]
    return json.loads(lines[-1][len("DRILL "):])


def test_losing_a_node_fails_no_query_and_the_replicas_come_back(drills):
    report = drills["node_loss"]
    assert report["sent"] >= 500
    assert report["failed"] == [], report["failed"][:5]
    assert report["wrong"] == [], report["wrong"][:5]
    assert report["killed_node_replicas"] >= 1  # the node lost did hold shard replicas
    assert report["recovered"], report["status"]


def test_a_replica_with_a_corrupt_local_copy_is_replaced_and_no_query_fails(drills):
    report = drills["corrupt_copy"]
    assert report["sent"] >= 500
    assert report["failed"] == [], report["failed"][:5]
    assert report["wrong"] == [], report["wrong"][:5]
    first, healed = report["first_readiness"], report["last_readiness"]
    assert first["ready"], first  # the other replica serves every shard meanwhile
    # The bad replica, seen unhealthy in the first answer, or already replaced by then (Serve checks a
    # replica's health as it starts, while the router is still finding its arm): then readiness says why.
    unhealthy = [r for r in first["replicas"] if not r["healthy"]]
    assert first["degraded"] == bool(unhealthy)
    unhealthy = unhealthy or [r for r in healed["replaced"] if r["node"] == report["bad_node"]]
    assert unhealthy, (first, healed)
    bad = unhealthy[0]
    assert bad["node"] == report["bad_node"]
    problem = next(s["problem"] for s in bad["shards"] if not s["ready"])
    assert "shard-00000" in problem and "node-local copy" in problem and "checksum mismatch" in problem
    assert healed["ready"] and not healed["degraded"], healed
    assert all(s["ready_replicas"] == 2 for s in healed["shards"])
    assert bad["replica"] in [r["replica"] for r in healed["replaced"]]  # and readiness says why it went


# --- the drill (runs in the subprocess) -----------------------------------------------------------------


def _expected(index_root: str) -> dict[str, list]:
    """(distance, id) top-10 of every id's similar query, from one unsharded flat index (itself left out)."""
    from serving.index.releases import load_index
    from serving.index.shards import Shard

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
        if actor.class_name.startswith(f"ServeReplica:{_index_app(app)}:images-shard"):
            counts[actor.node_id] = counts.get(actor.node_id, 0) + 1
    return counts


def _index_app(app: str) -> str:
    """The index application of router application ``app`` (serving/app.py: ``<app>-index-<key>``)."""
    from ray import serve

    [name] = [a for a in serve.status().applications if a.startswith(f"{app}-index-")]
    return name


def _shard_status(app: str) -> dict:
    from ray import serve

    deployments = serve.status().applications[_index_app(app)].deployments
    return {name: {"status": str(d.status), "replicas": {str(k): v for k, v in d.replica_states.items()}}
            for name, d in deployments.items() if name.startswith("images-shard")}


def _recovered(status: dict, replicas: int) -> bool:
    return all(s["status"].endswith("HEALTHY") and s["replicas"].get("RUNNING", 0) == replicas
               for s in status.values())


def _settings(index_root: str, cache: str, **more):
    from serving.app import ServeSettings

    return ServeSettings(index=index_root, shard_replicas=2, spread_shards=True, shard_num_cpus=0.1,
                         encoder_num_cpus=0.1, router_num_cpus=0.1, router_resources={"head": 0.01},
                         encoder_resources={"head": 0.01}, shard_resources={"shard_slot": 0.01},
                         shard_retries=4, shard_timeout_s=1.0, deadline_s=8.0, shard_cache_dir=cache, **more)


def _query_loop(url: str, expected: dict, answered: list, failed: list, wrong: list) -> None:
    """QUERIES similar-image queries, one after another; what failed and what was wrong."""
    ids = sorted(expected)
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


def _readiness(url: str) -> dict:
    import urllib.error

    try:
        with urllib.request.urlopen(url, timeout=15) as answer:
            return json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return json.loads(err.read())


def _reported(readiness: dict) -> bool:
    """Readiness built from reports of every shard (not yet: the arm unresolved, or a replica still silent)."""
    shards = readiness.get("shards") or []
    return bool(shards) and all(s["problem"] != "no replica has reported" for s in shards)


def drill(index_root: str, cache: str) -> dict:
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from tests.conftest import free_port

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"head": 10}})
    workers = [cluster.add_node(num_cpus=1, resources={"shard_slot": 10}) for _ in range(2)]
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    port = free_port()
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    expected = _expected(index_root)
    report = {"node_loss": node_loss_drill(cluster, workers, index_root, cache, port, expected),
              "corrupt_copy": corrupt_copy_drill(index_root, cache, port, expected)}
    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()
    return report


def node_loss_drill(cluster, workers, index_root: str, cache: str, port: int, expected: dict) -> dict:

    from serving.app import delete_apps, run_apps

    run_apps(_settings(index_root, f"{cache}/node-loss"), name="drill", route_prefix="/")
    url = f"http://127.0.0.1:{port}/v1/search/similar/"
    failed, wrong, answered = [], [], [0]
    before = _replica_nodes("drill")
    thread = threading.Thread(target=_query_loop, args=(url, expected, answered, failed, wrong))
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
    delete_apps("drill")
    return {"sent": answered[0], "failed": failed, "wrong": wrong,
            "killed_node_replicas": before.get(victim.node_id, 0), "recovered": _recovered(status, 2),
            "status": status, "replicas_per_node_before": before, "replicas_per_node_after": after}


def corrupt_copy_drill(index_root: str, cache: str, port: int, expected: dict) -> dict:
    """One shard-holding node starts with a corrupt local copy of shard-00000 (as after a disk fault)."""
    import shutil

    import ray

    from serving.storage import open_root
    from serving.app import delete_apps, run_apps
    from serving.runtime.replicas import cache_folder

    cache = f"{cache}/corrupt"
    bad_node = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"] and "shard_slot" in n["Resources"])[0]
    copy = cache_folder(cache, bad_node, open_root(index_root).uri) / "index" / "images"
    shutil.copytree(Path(index_root) / "index" / "images", copy)
    victim = sorted(copy.glob("v*/shard-00000.codes.npy"))[-1]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    run_apps(_settings(index_root, cache, shards_per_replica=SHARDS, shard_health_period_s=3.0),
             name="heal", route_prefix="/heal")
    ready_url = f"http://127.0.0.1:{port}/heal/v1/readyz"
    first = _readiness(ready_url)
    deadline = time.monotonic() + 60
    while not _reported(first) and time.monotonic() < deadline:  # the router is still finding its arm
        time.sleep(0.5)
        first = _readiness(ready_url)
    failed, wrong, answered = [], [], [0]
    _query_loop(f"http://127.0.0.1:{port}/heal/v1/search/similar/", expected, answered, failed, wrong)
    deadline = time.monotonic() + 120
    last = _readiness(ready_url)
    while not (last.get("ready") and not last.get("degraded") and last.get("replaced")) and time.monotonic() < deadline:
        time.sleep(1)
        last = _readiness(ready_url)
    delete_apps("heal")
    return {"sent": answered[0], "failed": failed, "wrong": wrong, "bad_node": bad_node,
            "first_readiness": first, "last_readiness": last}


if __name__ == "__main__":
    args = json.loads(sys.argv[1])
    print("DRILL " + json.dumps(drill(args["index"], args["cache"])), flush=True)
