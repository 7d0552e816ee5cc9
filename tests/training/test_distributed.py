"""Training as a Ray Train job: 2 CPU workers on a local Ray, tiny models, real images."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_config
from training.config import config_from_dict
from training.train import CHECKPOINT, fit

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def test_two_workers_shard_the_data_and_leave_a_usable_checkpoint(local_ray, subset, tiny_text_encoder, tmp_path):
    from evaluation.evaluate import evaluate_model
    from training.distributed import fit_distributed

    config = config_from_dict(tiny_config(tiny_text_encoder, epochs=2))
    metrics = fit_distributed(config, subset, tmp_path / "run", num_workers=2, storage_path=tmp_path / "ray",
                              cache_dir=tmp_path / "cache")
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
