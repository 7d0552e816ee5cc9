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


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_every_rank_gets_as_many_rows_and_steps_and_a_seed_of_its_own(world):
    import numpy as np

    from training.batches import CachedBatches, CaptionBatches
    from training.train import LoopContext

    features = torch.randn(2, 40, 3)  # (V, N, D)
    captions_of = [np.array([i]) for i in range(40)]
    for n in range(1, 40):
        rows = np.arange(n)
        contexts = [LoopContext(rank=r, world_size=world) for r in range(world)]
        shards = [c.shard(rows) for c in contexts]
        assert len({len(s) for s in shards}) == 1, (n, world, [len(s) for s in shards])
        assert set(np.concatenate(shards)) == set(rows)  # padding repeats rows, it drops none
        for batch_size in (2, 3, 4, 8):
            steps = {len(CachedBatches(features, s, np.zeros(40), captions_of, batch_size, 0.1, c.seed(0),
                                       noise_rows=rows)) for s, c in zip(shards, contexts)}
            steps |= {len(CaptionBatches(s, np.zeros(40), captions_of, batch_size, c.seed(0)))
                      for s, c in zip(shards, contexts)}
            assert len(steps) == 1, (n, world, batch_size, steps)
    seeds = [LoopContext(rank=r, world_size=world).seed(7) for r in range(world)]
    assert len(set(seeds)) == world and seeds[0] == 7  # rank 0 draws what one process would
    assert list(LoopContext().shard(np.arange(9))) == list(range(9))


def test_ranks_draw_different_batches_from_the_same_rows():
    import numpy as np

    from training.batches import CachedBatches
    from training.train import LoopContext

    features, rows = torch.randn(2, 16, 3), np.arange(16)
    captions_of = [np.array([2 * i, 2 * i + 1]) for i in range(16)]
    draws = []
    for rank in range(2):
        batches = CachedBatches(features, rows, np.zeros(16), captions_of, 16, 0.1,
                                LoopContext(rank=rank, world_size=2).seed(0), noise_rows=rows)
        batch = next(iter(batches))
        draws.append((batch.images.tolist(), batch.captions.tolist(), batch.weak))
    assert draws[0][0] != draws[1][0] and draws[0][1] != draws[1][1]
    assert not torch.equal(draws[0][2], draws[1][2])


def test_a_last_batch_of_one_row_joins_the_one_before():
    from training.batches import batch_bounds

    assert batch_bounds(9, 4) == [(0, 4), (4, 9)]  # not (8, 9): batch norm needs two rows
    assert batch_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert batch_bounds(1, 4) == [(0, 1)] and batch_bounds(0, 4) == []


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
    """How many checkpoints Ray Train's controller has registered for the run under ``storage``
    (a folder, or an S3Watch of a bucket prefix)."""
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


def test_killed_worker_is_replaced_and_training_resumes_from_the_checkpoint(local_ray, subset, tiny_text_encoder,
                                                                              tmp_path, request, monkeypatch):
    """The uninterrupted baseline reports to local storage; the interrupted run to S3 on loopback
    (Ray Train reads both through the same pyarrow filesystem layer, so one resumed run covers it)."""
    from training.distributed import fit_distributed

    data = tiny_config(tiny_text_encoder, epochs=16)
    data["train"]["eval_every"] = 2
    config = config_from_dict(data)
    config.distributed.num_workers = 2
    config.distributed.storage = str(tmp_path / "ray_a")
    baseline = fit_distributed(config, subset, tmp_path / "baseline", cache_dir=tmp_path / "cache")

    # checkpoints go to an S3 endpoint on loopback; the killer watches the bucket
    monkeypatch.setenv("AWS_ENDPOINT_URL", request.getfixturevalue("s3_endpoint"))
    target, watched = f"s3://terrahash-test/{tmp_path.name}", S3Watch(f"{tmp_path.name}/")
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


@pytest.mark.timeout(480)  # a hang lasts until gloo's 30-minute timeout
def test_shards_that_straddle_a_batch_boundary_do_not_hang(local_ray, ucm_dir, tiny_text_encoder, tmp_path):
    """9 train rows on 2 workers in batches of 4: split as 5 and 4 rows, one worker would run 2
    steps an epoch and the other 1, and the first would wait in DDP's all-reduce for ever."""
    from tests.conftest import write_subset
    from training.distributed import fit_distributed

    data = write_subset(ucm_dir, tmp_path / "nine", per_split={"train": 3, "val": 2, "test": 2})
    raw = tiny_config(tiny_text_encoder, epochs=2)
    raw["train"]["batch_size"] = 4
    # Heads without hidden layers have no batch norm, so nothing fails on a one-row batch: a
    # mismatched step count shows as the hang itself, not as an error.
    raw["image"]["head_hidden"], raw["text"]["head_hidden"] = [], []
    config = config_from_dict({**raw, "distributed": {"num_workers": 2, "cpus_per_worker": 1.0,
                                                      "storage": str(tmp_path / "ray")}})
    metrics = fit_distributed(config, data, tmp_path / "run", cache_dir=tmp_path / "cache")

    assert metrics["world_size"] == 2 and len(metrics["history"]) == 2
    assert metrics["rows_per_worker"] == 5  # 9 rows padded to 10 by wrapping around: 5 each
