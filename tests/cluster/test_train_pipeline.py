"""Train -> distill -> index build, submitted as one queued pipeline to the 3-node cluster `terrahash cluster up`
started, with the artifact root on an S3 endpoint on loopback and MLflow on a real server; the node its training
workers run on is killed mid-training (and, as an autoscaler would, replaced), and the job still finishes.

Placement is forced so that the test knows which node to kill: every driver runs on worker 1 (the queued
ones wait there, with no CPU), and the training driver holds worker 1's only CPU, so the one Ray Train worker
(1 CPU, on any worker node, never the head) can only run on worker 2."""
from __future__ import annotations

import json
import threading
import time
import urllib.parse
import urllib.request

import pytest
import yaml

pytest.importorskip("ray.job_submission")
pytest.importorskip("mlflow")

from serving.storage import open_root  # noqa: E402
from cluster.cli.main import main  # noqa: E402
from cluster.jobs import _token, describe  # noqa: E402
from cluster.jobs import logs as job_logs  # noqa: E402
from cluster.local_cluster import ClusterState, add_worker, kill_node, status  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402
from tests.training.test_distill_job import TINY_STUDENTS  # noqa: E402

BUCKET = "s3://terrahash-test/pipeline"
ON_WORKER_1 = ["--entrypoint-resource", "terrahash-node-1=0.01"]


def _submitted(out: str) -> list[str]:
    return [line.split()[1].rstrip(";,") for line in out.splitlines() if line.startswith("submitted ")]


def _train_workers(dashboard_url: str) -> list[dict]:
    """The Ray Train worker actors the cluster has run (alive or dead), from Ray's state API over HTTP."""
    query = urllib.parse.urlencode({"filter_keys": "class_name", "filter_predicates": "=",
                                    "filter_values": "RayTrainWorker", "limit": 100, "detail": 1})
    request = urllib.request.Request(f"{dashboard_url}/api/v0/actors?{query}",
                                     headers={"Authorization": f"Bearer {_token()}"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read())["data"]["result"]["result"]


class NodeKiller(threading.Thread):
    """Once the training run has reported a few checkpoints, kill worker 2 and start a replacement node.
    (A checkpoint in the bucket is not yet one the run can resume from: the controller registers a
    worker's report when it next polls the workers, so the killer waits for the fourth.)"""

    def __init__(self, storage: str, node_id: str):
        super().__init__(daemon=True)
        self.root, self.node_id, self.killed, self.error = open_root(storage), node_id, [], None

    def run(self):
        try:
            deadline = time.monotonic() + 300
            while not any("/epoch-0004/" in key for key in self.root.list()):
                if time.monotonic() > deadline:
                    raise TimeoutError("no checkpoint reached the bucket in 300 s")
                time.sleep(0.2)
            self.killed.append(kill_node(self.node_id))
            add_worker()
        except BaseException as err:  # noqa: BLE001  (reported by the test)
            self.error = err


@pytest.mark.timeout(900)
def test_a_queued_pipeline_lands_in_s3_and_the_registry_and_survives_losing_a_node(
        local_cluster, s3_endpoint, mlflow_server, subset, tiny_text_encoder, tmp_path, monkeypatch, capsys):
    from mlflow import MlflowClient

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)  # forwarded to the jobs, with the S3 keys
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    tracking = {"tracking_uri": mlflow_server, "experiment": "pipeline", "system_metrics": False}
    teacher_config = tiny_config(tiny_text_encoder, epochs=12, tracking=tracking)
    teacher_config["train"]["eval_every"] = 1  # a checkpoint every epoch
    (tmp_path / "teacher.yaml").write_text(yaml.safe_dump(teacher_config))
    (tmp_path / "students.yaml").write_text(yaml.safe_dump(
        {**TINY_STUDENTS, "registered_model": "pipeline-students", "tracking": tracking}))
    data, cache = ["--data", str(subset)], ["--cache-dir", str(tmp_path / "cache")]
    teacher, storage, index = f"{BUCKET}/teacher", f"{BUCKET}/ray", f"{BUCKET}/index"
    nodes = {n["node"]: n for n in status()["nodes"] if n["alive"]}
    assert {"head", "worker 1", "worker 2"} <= set(nodes)

    assert main(["submit", "--no-follow", "--print-id", "--entrypoint-cpus", "1", *ON_WORKER_1, "--", "train", "--config", str(tmp_path / "teacher.yaml"), *data, *cache, "--out", teacher,
                 "--workers", "1", "--max-failures", "2", "--storage", storage, "--eval-split", "none"]) == 0
    train_id = capsys.readouterr().out.strip()  # --print-id: the id alone, as a script takes it
    assert train_id.startswith("terrahash-train-") and "\n" not in train_id
    killer = NodeKiller(storage, nodes["worker 2"]["node_id"])
    killer.start()
    assert main(["submit", "--no-follow", "--print-id", "--after", train_id, *ON_WORKER_1, "--", "distill", "--teacher", teacher,
                 "--config", str(tmp_path / "students.yaml"), *data, *cache]) == 0
    distill_id = capsys.readouterr().out.strip()
    # The last step is followed: its logs stream here, and its exit status is the pipeline's.
    code = main(["submit", "--after", distill_id, *ON_WORKER_1, "--", "index", "build", "--model", f"{teacher}/students/onnx",
                 "--shards", "2", "--out", index, *data])
    out = capsys.readouterr().out
    killer.join(timeout=120)
    assert killer.error is None, killer.error
    assert code == 0, out + "\n--- train ---\n" + job_logs(train_id)[-3000:] + "\n--- distill ---\n" + \
        job_logs(distill_id)[-3000:]  # every driver ran on worker 1, which is alive
    assert f"job {distill_id}: SUCCEEDED" in out  # what the waiting step printed before it ran
    assert describe(train_id)["status"] == describe(distill_id)["status"] == "SUCCEEDED"

    # The node running the training worker was killed mid-run, and Ray Train resumed on the new node.
    assert killer.killed and killer.killed[0] > 0
    workers = _train_workers(local_cluster["dashboard_url"])
    on = {w["node_id"] for w in workers}
    assert nodes["worker 2"]["node_id"] in on and len(on) >= 2, workers
    root = open_root(BUCKET)
    metrics = json.loads(root.read_bytes("teacher/metrics.json"))
    assert metrics["resumed_from_epoch"] >= 1, job_logs(train_id)[-4000:]
    assert metrics["ray_checkpoint"].startswith("terrahash-test/pipeline/ray")

    # Everything a later step read came from the bucket or the registry; nothing names a local output.
    keys = root.list()
    assert {"teacher/MANIFEST.json", "teacher/checkpoint.pt", "teacher/students/MANIFEST.json",
            "teacher/students/onnx/image_student.onnx"} <= set(keys)
    release = json.loads(root.read_bytes("index/index/releases/r0001.json"))  # the index root's index/ folder
    version = release["collections"]["images"]["version"]
    manifest = json.loads(root.read_bytes(f"index/index/images/{version}/manifest.json"))
    assert "model_dir" not in manifest["extra"] and not manifest["extra"]["model_files"].startswith("/")
    assert f"index/{manifest['extra']['model_files']}/MANIFEST.json" in keys
    from serving.storage import fetch_folder

    copy = fetch_folder(f"{BUCKET}/index/{manifest['extra']['model_files']}", tmp_path / "fetched")
    assert copy.name == "onnx" and (copy / "image_student.onnx").is_file()  # every file checks out
    client = MlflowClient(mlflow_server)
    versions = client.search_model_versions("name='pipeline-students'")
    assert len(versions) == 1 and versions[0].tags["teacher.run_id"] == metrics["mlflow_run_id"]
    assert client.get_run(metrics["mlflow_run_id"]).info.status == "FINISHED"


def _driver_pid(job_id: str) -> int | None:
    from cluster.jobs import client

    info = client().get_job_info(job_id)
    return getattr(info.driver_info, "pid", None) and int(info.driver_info.pid)


@pytest.mark.timeout(600)
def test_a_failed_job_is_retried_from_its_last_checkpoint_and_a_queue_behind_it_follows(
        local_cluster, s3_endpoint, subset, tiny_text_encoder, tmp_path, monkeypatch):
    """Attempt 1's driver dies mid-training (SIGKILL: the job fails); `--retries 1` submits attempt 2, which
    resumes the same Ray Train run from its last checkpoint in S3; `jobs wait` on attempt 1, as a queued
    job's entrypoint runs it, follows it into attempt 2 and succeeds."""
    import os
    import signal

    from cluster.jobs import submit

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    config = tiny_config(tiny_text_encoder, epochs=12)
    config["train"]["eval_every"] = 1
    (tmp_path / "teacher.yaml").write_text(yaml.safe_dump(config))
    storage, out = "s3://terrahash-test/retried/ray", "s3://terrahash-test/retried/teacher"
    said: list[str] = []
    outcome: list = []
    follower = threading.Thread(target=lambda: outcome.append(submit(
        ["train", "--config", str(tmp_path / "teacher.yaml"), "--data", str(subset), "--cache-dir",
         str(tmp_path / "cache"), "--out", out, "--workers", "1", "--storage", storage, "--eval-split", "none"],
        retries=1, say=said.append)), daemon=True)
    follower.start()
    deadline = time.monotonic() + 300
    while not any(line.startswith("submitted ") for line in said):
        assert time.monotonic() < deadline and follower.is_alive(), said
        time.sleep(0.2)
    first = said[0].split()[1]
    waiter: list[int] = []
    queue = threading.Thread(target=lambda: waiter.append(main(["jobs", "wait", first])), daemon=True)
    queue.start()
    root = open_root(storage)
    while not any("/epoch-0004/" in key for key in root.list()):
        assert time.monotonic() < deadline, said
        time.sleep(0.2)
    os.kill(_driver_pid(first), signal.SIGKILL)  # the driver's machine would have gone; the job fails
    follower.join(timeout=400)
    queue.join(timeout=60)
    assert outcome and outcome[0][1] == "SUCCEEDED", said
    assert outcome[0][0] == f"{first}-attempt2" and describe(first)["status"] == "FAILED"
    assert waiter == [0]  # the queue waited through the failure for the retry
    metrics = json.loads(open_root("s3://terrahash-test/retried").read_bytes("teacher/metrics.json"))
    assert metrics["resumed_from_epoch"] >= 1, job_logs(outcome[0][0])[-3000:]  # not trained from scratch
