"""`terrahash submit` and `terrahash jobs` on the real 3-node cluster `terrahash cluster up` started: logs, exit
status, metadata, driver placement, retries of failed jobs (never of stopped ones) and queued jobs."""
from __future__ import annotations

import json
import threading
import time

import pytest

from cluster.cli.main import main
from cluster.jobs import describe, list_jobs, stop, wait
from cluster.jobs import logs as job_logs

pytest.importorskip("ray.job_submission")


@pytest.fixture(scope="module")
def index_root(tmp_path_factory) -> str:
    """A small real index release (random codes, no model needed) for `index verify` jobs."""
    from serving.model.codes import random_codes
    from serving.index.releases import publish_release
    from serving.index.versions import build_index

    root = tmp_path_factory.mktemp("jobs_index")
    manifest = build_index(random_codes(40, 16, seed=3), [f"item{i:02d}" for i in range(40)], 16, 2, root,
                           model_version="m@1")
    publish_release(root, {"images": manifest, "captions": None})
    return str(root)


@pytest.fixture
def cluster_home(local_cluster, monkeypatch):
    import os

    monkeypatch.setenv("TERRAHASH_HOME", os.environ["TERRAHASH_HOME"])
    return local_cluster


def _submitted(out: str) -> list[str]:
    return [line.split()[1].rstrip(";,") for line in out.splitlines() if line.startswith("submitted ")]


def test_a_job_streams_its_logs_and_exits_with_its_status(cluster_home, index_root, capsys):
    assert main(["submit", "--", "index", "verify", index_root]) == 0
    out = capsys.readouterr().out
    job_id = _submitted(out)[0]
    assert job_id.startswith("terrahash-index-verify-") and "all good" in out and f"job {job_id}: SUCCEEDED" in out
    info = describe(job_id)
    meta = info["metadata"]
    assert meta["terrahash.command"] == f"index verify {index_root}" and len(meta["terrahash.config_hash"]) == 16
    assert meta["terrahash.attempt"] == "1" and "@" in meta["terrahash.submitted_by"]
    assert meta["terrahash.git_commit"]
    from ray.job_submission import JobSubmissionClient

    from cluster.jobs import _token

    details = JobSubmissionClient(cluster_home["dashboard_url"],
                                  headers={"Authorization": f"Bearer {_token()}"}).get_job_info(job_id)
    head = next(n for n in json.loads(_status_json(capsys))["nodes"] if n["node"] == "head")
    assert details.driver_node_id and details.driver_node_id != head["node_id"]  # the driver ran on a worker
    assert main(["jobs", "status", job_id]) == 0 and "SUCCEEDED" in capsys.readouterr().out
    assert main(["jobs", "logs", job_id]) == 0 and "all good" in capsys.readouterr().out
    assert main(["jobs", "list"]) == 0 and job_id in capsys.readouterr().out


def _status_json(capsys) -> str:
    assert main(["cluster", "status", "--json"]) == 0
    return capsys.readouterr().out


def test_a_failed_job_is_resubmitted_with_an_id_naming_the_attempt(cluster_home, tmp_path, capsys):
    missing = str(tmp_path / "no-index-here")
    assert main(["submit", "--retries", "1", "--", "index", "verify", missing]) == 1
    first, second = _submitted(capsys.readouterr().out)
    assert second == f"{first}-attempt2"
    assert describe(first)["status"] == describe(second)["status"] == "FAILED"
    assert describe(second)["metadata"]["terrahash.attempt"] == "2"


def test_a_stopped_job_is_not_retried_and_a_queue_waits_on_the_cluster(cluster_home, index_root, capsys):
    # A job whose driver needs a resource no node has stays pending; one waiting for it runs until stopped.
    assert main(["submit", "--no-follow", "--entrypoint-resource", "nowhere=1", "--", "index", "verify",
                 index_root]) == 0
    pending = _submitted(capsys.readouterr().out)[0]
    assert main(["submit", "--no-follow", "--", "jobs", "wait", pending]) == 0
    blocker = _submitted(capsys.readouterr().out)[0]
    queued_ok, queued_bad = [], []
    outcome = {}

    def follow_waiter():
        outcome["code"] = main(["submit", "--retries", "2", "--", "jobs", "wait", blocker])

    waiter = threading.Thread(target=follow_waiter)
    waiter.start()
    deadline = time.monotonic() + 120
    while not [j for j in list_jobs() if j["metadata"].get("terrahash.command") == f"jobs wait {blocker}"
               and j["status"] == "RUNNING"]:
        assert time.monotonic() < deadline, "the waiting job never started"
        time.sleep(0.5)
    waiting = next(j["id"] for j in list_jobs() if j["metadata"].get("terrahash.command") == f"jobs wait {blocker}")
    assert main(["jobs", "stop", waiting]) == 0
    waiter.join(timeout=120)
    assert _submitted(capsys.readouterr().out) == [waiting]  # the waiter's own output
    assert outcome["code"] == 3  # stopped: the exit status says so, and nothing was resubmitted
    assert not [j for j in list_jobs() if j["id"] == f"{waiting}-attempt2"]

    # A queue: the second job runs only once the first has succeeded; one behind a failed job never runs.
    assert main(["submit", "--no-follow", "--", "index", "verify", index_root]) == 0
    first = _submitted(capsys.readouterr().out)[0]
    assert main(["submit", "--no-follow", "--after", first, "--", "index", "verify", index_root]) == 0
    queued_ok.append(_submitted(capsys.readouterr().out)[0])
    assert main(["submit", "--no-follow", "--after", blocker, "--", "index", "verify", index_root]) == 0
    queued_bad.append(_submitted(capsys.readouterr().out)[0])
    assert wait(queued_ok[0], timeout=180) == "SUCCEEDED", (describe(queued_ok[0]), job_logs(queued_ok[0]))
    assert describe(queued_ok[0])["metadata"]["terrahash.after"] == first
    stop(blocker)
    assert wait(queued_bad[0], timeout=180) == "FAILED"
    assert main(["jobs", "logs", queued_bad[0]]) == 0
    logs = capsys.readouterr().out
    assert f"job {blocker}: STOPPED" in logs and "all good" not in logs  # its command never ran


@pytest.mark.parametrize("answer", ["y", "n"])
def test_ctrl_c_asks_whether_to_stop_the_job(cluster_home, monkeypatch, answer):
    """A job that runs until stopped (a web server, `--module http.server`); Ctrl-C while its logs stream
    asks, on a terminal, whether to stop it too, and does what the answer says."""
    import builtins
    import sys

    from cluster import jobs

    asked, said = [], []
    monkeypatch.setattr(jobs, "follow", lambda job_id, address=None: (_ for _ in ()).throw(KeyboardInterrupt()))
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    monkeypatch.setattr(builtins, "input", lambda prompt: asked.append(prompt) or answer)
    with pytest.raises(KeyboardInterrupt):
        jobs.submit(["0", "--bind", "127.0.0.1"], module="http.server", say=said.append)
    job_id = said[0].split()[1]
    assert job_id.startswith("terrahash-server-") and asked == [f"\nstop job {job_id} too? [y/N] "]
    if answer == "y":
        assert wait(job_id, timeout=60) == "STOPPED" and f"asked {job_id} to stop" in said
    else:
        assert "left job" in said[-1] and describe(job_id)["status"] in ("PENDING", "RUNNING")
        stop(job_id)
        assert wait(job_id, timeout=60) == "STOPPED"


def test_the_gpu_benchmark_runs_unchanged_as_a_job_on_a_worker_type(cluster_home, subset, tiny_text_encoder,
                                                                     tmp_path, capsys):
    """`submit --worker-type cpu --module evaluation.bench_gpu_train`: the benchmark script as it is, its Ray
    Train worker placed by the worker type (on this machine's cluster, CPU nodes: it says it found no GPU)."""
    import yaml

    from tests.conftest import tiny_config

    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(tiny_config(tiny_text_encoder)))
    assert main(["submit", "--worker-type", "cpu", "--module", "evaluation.bench_gpu_train", "--",
                 "--config", str(tmp_path / "tiny.yaml"), "--epochs", "2", "--data", str(subset)]) == 0
    out = capsys.readouterr().out
    job_id = _submitted(out)[0]
    assert job_id.startswith("terrahash-bench-gpu-train-") and f"job {job_id}: SUCCEEDED" in out
    assert "on CPU (no GPU found), 1 worker(s)" in out and "training images/s: " in out
    assert "'terrahash-worker-cpu': 0.001" in out  # Ray Train asked for the worker type's nodes
    assert describe(job_id)["metadata"]["terrahash.command"].startswith("python -m evaluation.bench_gpu_train")
    assert main(["submit", "--worker-type", "gpu", "--", "cluster", "status"]) == 2
    assert "no worker type 'gpu' in the cluster; its types: cpu" in capsys.readouterr().err
