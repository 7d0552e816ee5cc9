"""Training as a Ray Train job: 2 CPU workers on a local Ray, tiny models, real images."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_config
from training.config import config_from_dict
from training.train import CHECKPOINT, fit

ray = pytest.importorskip("ray")


def test_a_ray_job_needs_at_least_one_worker(subset, tiny_text_encoder, tmp_path):
    from training.distributed import fit_distributed

    with pytest.raises(ValueError, match="num_workers must be >= 1"):
        fit_distributed(config_from_dict(tiny_config(tiny_text_encoder)), subset, tmp_path / "run")


def test_two_workers_shard_the_data_and_leave_a_usable_checkpoint(local_ray, subset, tiny_text_encoder, tmp_path):
    from evaluation.evaluate import evaluate_model
    from training.distributed import fit_distributed

    config = config_from_dict({**tiny_config(tiny_text_encoder, epochs=2),
                               "distributed": {"num_workers": 2, "storage": str(tmp_path / "ray")}})
    metrics = fit_distributed(config, subset, tmp_path / "run", cache_dir=tmp_path / "cache")
    single = fit(config, subset, tmp_path / "single", cache_dir=tmp_path / "cache", progress=False)

    assert metrics["world_size"] == 2
    assert metrics["rows_per_worker"] == single["rows_per_worker"] // 2  # 12 train rows, 6 each
    assert len(metrics["history"]) == 2 and all(torch.isfinite(torch.tensor(e["loss"]["total"]))
                                                for e in metrics["history"])
    # The reported Ray Train checkpoint holds the chief's files.
    reported = sorted(p.name for p in Path(metrics["ray_checkpoint"]).iterdir())
    assert CHECKPOINT in reported and "config.yaml" in reported
    report = evaluate_model(tmp_path / "run", subset, "test", cache_dir=tmp_path / "cache", device="cpu")
    assert 0.0 <= report["image_to_image"]["map_all"] <= 1.0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["world_size"] == 2


def train_worker_pids() -> list[int]:
    """PIDs of live Ray Train worker processes (Ray titles them ``ray::RayTrainWorker...``)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if b"RayTrainWorker" in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                continue  # the process ended while we looked
    return sorted(pids)


class S3Watch:
    """The part of the test bucket a run stores its state under, read like a folder."""

    def __init__(self, prefix: str):
        import boto3

        self.prefix = prefix
        self.client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])

    def snapshots(self) -> list[bytes]:
        listing = self.client.list_objects_v2(Bucket="terrahash-test", Prefix=self.prefix).get("Contents", [])
        return [self.client.get_object(Bucket="terrahash-test", Key=o["Key"])["Body"].read()
                for o in listing if o["Key"].endswith("checkpoint_manager_snapshot.json")]


def registered_checkpoints(storage) -> int:
    """How many checkpoints Ray Train's controller has registered for the run under ``storage``."""
    if isinstance(storage, S3Watch):
        texts = storage.snapshots()
    else:
        texts = [p.read_bytes() for p in storage.rglob("checkpoint_manager_snapshot.json")]
    for text in texts:
        try:
            return len(json.loads(text)["checkpoint_results"])
        except (ValueError, KeyError):
            return 0  # being written
    return 0


def kill_a_worker_after_first_checkpoint(storage: Path, killed: list, timeout: float = 120.0) -> None:
    """Wait until a checkpoint is registered, then SIGKILL one Ray Train worker process."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if registered_checkpoints(storage) >= 1:
            pids = train_worker_pids()
            if pids:
                os.kill(pids[-1], signal.SIGKILL)
                killed.append(pids[-1])
                return
        time.sleep(0.05)


@pytest.mark.parametrize("storage", ["local", "s3"])
def test_killed_worker_is_replaced_and_training_resumes_from_the_checkpoint(local_ray, subset, tiny_text_encoder,
                                                                              tmp_path, request, monkeypatch, storage):
    from training.distributed import fit_distributed

    data = tiny_config(tiny_text_encoder, epochs=16)
    data["train"]["eval_every"] = 2
    config = config_from_dict(data)
    config.distributed.num_workers = 2
    config.distributed.storage = str(tmp_path / "ray_a")
    baseline = fit_distributed(config, subset, tmp_path / "baseline", cache_dir=tmp_path / "cache")

    if storage == "s3":  # checkpoints go to an S3 endpoint on loopback; the killer watches the bucket
        monkeypatch.setenv("AWS_ENDPOINT_URL", request.getfixturevalue("s3_endpoint"))
        target, watched = f"s3://terrahash-test/{tmp_path.name}", S3Watch(f"{tmp_path.name}/")
    else:
        target, watched = tmp_path / "ray_b", tmp_path / "ray_b"
    killed: list[int] = []
    killer = threading.Thread(target=kill_a_worker_after_first_checkpoint, args=(watched, killed))
    killer.start()
    config.distributed.storage, config.distributed.max_failures = str(target), 1
    recovered = fit_distributed(config, subset, tmp_path / "recovered", cache_dir=tmp_path / "cache")
    killer.join()

    assert killed, "no worker was killed: the run ended before its first checkpoint"
    assert recovered["resumed_from_epoch"] >= 2  # restarted from a reported checkpoint, not from scratch
    assert baseline["resumed_from_epoch"] == 0
    # Same seed, same data: the interrupted run ends where the uninterrupted one does.
    assert recovered["best_epoch"] == baseline["best_epoch"]
    for task in ("image_to_image", "text_to_image"):
        assert recovered["val"]["binary"][task]["map_all"] == pytest.approx(
            baseline["val"]["binary"][task]["map_all"], abs=0.02)
    assert recovered["history"][-1]["loss"]["total"] == pytest.approx(baseline["history"][-1]["loss"]["total"],
                                                                      rel=0.05)
