"""The training schedules (joint, sync, async), the image/text snapshot exchange, and the MLflow parent run."""
from __future__ import annotations

import json
import math
import threading

import numpy as np
import pytest
import torch

from evaluation.evaluate import run_eval
from tests.conftest import tiny_config
from training.config import ConfigError, config_from_dict
from training.jobs import check_schedule, run_training
from training.snapshots import Snapshot, SnapshotError, SnapshotStore, wait_for
from training.train import CHECKPOINT, DatasetIndex, LoopContext, fit, load_trained
from serving.ingest.dataset import load_dataset


def split_config(text_folder, schedule: str, epochs: int = 4, **extra) -> dict:
    config = tiny_config(text_folder, epochs=epochs)
    config["train"].update(schedule=schedule, text_final_epochs=2, snapshot_every=1)
    config.update(extra)
    return config


def snapshot(version: int, final: bool = False) -> Snapshot:
    return Snapshot(version, version, 0, final, np.zeros((3, 16), np.float32), np.zeros((2, 16), np.float32))


def test_store_keeps_the_newest_and_reports_failure():
    store = SnapshotStore()
    assert store.latest() is None
    store.publish(snapshot(2))
    store.publish(snapshot(1))  # late and older: ignored
    assert store.latest().version == 2
    store.fail("image job crashed")
    with pytest.raises(SnapshotError, match="image job crashed"):
        wait_for(store)


def test_wait_for_the_final_snapshot_returns_as_soon_as_it_is_published():
    store = SnapshotStore()
    store.publish(snapshot(1))
    assert wait_for(store).version == 1  # a non-final one is enough outside the last epochs
    threading.Timer(0.3, store.publish, [snapshot(5, final=True)]).start()
    got = wait_for(store, final=True, poll=0.05, timeout=10)
    assert got.final and got.version == 5
    with pytest.raises(SnapshotError, match="no final image snapshot"):
        wait_for(SnapshotStore(), final=True, poll=0.01, timeout=0.05)


@pytest.mark.parametrize("change, message", [
    ({"schedule": "sometimes"}, "unknown 'sometimes'"),
    ({"schedule": "sync", "text_final_epochs": 0}, "text_final_epochs"),
    ({"schedule": "async", "snapshot_every": 0}, "snapshot_every"),
])
def test_bad_schedule_settings_fail_before_any_work(tiny_text_encoder, change, message):
    config = tiny_config(tiny_text_encoder)
    config["train"].update(change)
    with pytest.raises(ConfigError, match=message):
        check_schedule(config_from_dict(config))


def test_split_roles_need_a_snapshot_store(subset, tiny_text_encoder, tmp_path):
    config = config_from_dict(tiny_config(tiny_text_encoder))
    with pytest.raises(ValueError, match="exchanges snapshots"):
        fit(config, subset, tmp_path, role="text")


def test_image_job_publishes_its_selected_checkpoint_without_test_rows(subset, tiny_text_encoder, tmp_path):
    from training.features import FeatureCache
    from training.train import Encoders, image_codes

    config = config_from_dict(split_config(tiny_text_encoder, "async"))
    store = SnapshotStore()
    metrics = fit(config, subset, tmp_path / "image", cache_dir=tmp_path / "cache", progress=False,
                  context=LoopContext(snapshots=store), role="image")
    final = store.latest()
    assert final.final and final.image_epoch == metrics["best_epoch"]
    assert final.version > 4  # snapshot_every=1: one per step before the final one
    # Val figures of the image job are image-to-image only: its text head is untrained.
    assert set(metrics["val"]["binary"]) == {"image_to_image"}

    index = DatasetIndex.build(load_dataset(subset))
    test_rows, shared = index.rows("test"), index.rows("train", "val")
    assert np.isnan(final.codes[test_rows]).all() and not np.isnan(final.codes[shared]).any()
    model, loaded_config, _ = load_trained(tmp_path / "image")
    codes = image_codes(Encoders(model, loaded_config, index, FeatureCache(tmp_path / "cache"), torch.device("cpu")))
    np.testing.assert_allclose(final.codes[shared], codes[shared], atol=1e-5)
    np.testing.assert_allclose(final.proxies, torch.load(tmp_path / "image" / CHECKPOINT)["objective"]["proxy.proxies"])


def test_text_job_uses_the_newest_snapshot_and_selects_only_against_the_final_one(subset, tiny_text_encoder,
                                                                                   tmp_path):
    index = DatasetIndex.build(load_dataset(subset))
    rng = np.random.default_rng(0)
    codes = lambda: np.tanh(rng.normal(size=(len(index.labels), 16))).astype(np.float32)  # noqa: E731
    proxies = np.tanh(rng.normal(size=(3, 16))).astype(np.float32)
    store = SnapshotStore()
    store.publish(Snapshot(1, 10, 1, False, codes(), proxies))
    config = config_from_dict(split_config(tiny_text_encoder, "async"))
    # The final snapshot comes late: the first two epochs must not wait for it, the last two must.
    timer = threading.Timer(3.0, store.publish, [Snapshot(7, 70, 4, True, codes(), proxies)])
    timer.start()
    metrics = fit(config, subset, tmp_path / "text", cache_dir=tmp_path / "cache", progress=False,
                  context=LoopContext(snapshots=store), role="text")
    timer.cancel()
    used = [e["snapshot"] for e in metrics["history"]]
    assert used == [{"version": 1, "final": False}] * 2 + [{"version": 7, "final": True}] * 2
    assert metrics["best_epoch"] == 4  # evaluated at 2 (not eligible) and 4


def test_sync_schedule_combines_the_image_and_text_jobs(subset, tiny_text_encoder, tmp_path):
    config = config_from_dict(split_config(tiny_text_encoder, "sync"))
    metrics = run_training(config, subset, tmp_path / "run", cache_dir=tmp_path / "cache", evaluate=run_eval)
    run = tmp_path / "run"
    image = torch.load(run / "image" / CHECKPOINT)
    text = torch.load(run / "text" / CHECKPOINT)
    combined = torch.load(run / CHECKPOINT)
    for key, value in image["image_head"].items():
        assert torch.equal(combined["image_head"][key], value)
    for key, value in text["text_head"].items():
        assert torch.equal(combined["text_head"][key], value)
    # Sync: the text job starts after the image job, so it learns against the final snapshot throughout.
    assert all(e["snapshot"]["final"] for e in metrics["jobs"]["text"]["history"])
    assert combined["text_epoch"] == metrics["best_epoch"]["text"]
    assert metrics["schedule"] == "sync" and combined["val"] == text["val"]
    load_trained(run)  # loads as one model
    report = json.loads((run / "eval_test.json").read_text())
    assert metrics["eval"]["test/text_to_image/map_all"] == report["text_to_image"]["map_all"]


def test_joint_schedule_writes_the_eval_report(subset, tiny_text_encoder, tmp_path):
    config = config_from_dict(tiny_config(tiny_text_encoder, epochs=2))
    metrics = run_training(config, subset, tmp_path / "run", cache_dir=tmp_path / "cache", eval_split="val",
                           evaluate=run_eval)
    assert metrics["schedule"] == "joint" and metrics["eval"]["split"] == "val"
    report = json.loads((tmp_path / "run" / "eval_val.json").read_text())
    assert report["split"] == "val" and metrics["eval"]["val/mr"] == report["mr"]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["eval"] == metrics["eval"]


def test_async_schedule_on_ray_is_tracked_as_parent_and_child_runs(local_ray, mlflow_server, subset,
                                                                    tiny_text_encoder, tmp_path, monkeypatch):
    """The bar: a 2-worker CPU Ray Train image job beside a text job, against a real MLflow server."""
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
    raw = split_config(tiny_text_encoder, "async", epochs=4,
                       distributed={"num_workers": 2, "cpus_per_worker": 0.5, "storage": str(tmp_path / "ray")})
    raw["tracking"] = {"tracking_uri": mlflow_server, "experiment": "schedules"}
    metrics = run_training(config_from_dict(raw), subset, tmp_path / "run", cache_dir=tmp_path / "cache",
                           evaluate=run_eval)

    client = MlflowClient(mlflow_server)
    parent = client.get_run(metrics["mlflow_run_id"])
    assert parent.info.status == "FINISHED" and parent.info.run_name == "tiny-16bits-async"
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_name = {run.info.run_name: run for run in children}
    assert sorted(by_name) == ["eval", "image", "text"]
    assert metrics["jobs"]["image"]["world_size"] == 2 and metrics["jobs"]["text"]["world_size"] == 1
    assert by_name["image"].info.run_id == metrics["jobs"]["image"]["mlflow_run_id"]

    # Per-job losses: only the image terms in the image run, only the text terms in the text run.
    assert "loss/self_distill" in by_name["image"].data.metrics and "loss/contrastive" not in by_name["image"].data.metrics
    assert "loss/contrastive" in by_name["text"].data.metrics and "loss/hash_proxy" not in by_name["text"].data.metrics
    assert "val/binary/text_to_image/map_all" in by_name["text"].data.metrics
    # Every phase has its energy, per run and per 1,000 images, and says how it was obtained.
    for run in (parent, *children):
        logged = run.data.metrics
        for key in ("energy_kwh", "emissions_kg_co2eq", "energy_kwh_per_1k_images"):
            assert math.isfinite(logged[key]) and logged[key] > 0, (run.info.run_name, key)
        assert run.data.params["energy.method"] and run.data.tags["energy.source"]
    assert by_name["eval"].data.params["energy.images_processed"] == "24"  # the whole subset is encoded once
    # The final evaluation is in the eval run and the parent, equal to the report the parent stores.
    report = json.loads((tmp_path / "run" / "eval_test.json").read_text())
    for run in (parent, by_name["eval"]):
        assert run.data.metrics["test/image_to_image/map_all"] == pytest.approx(report["image_to_image"]["map_all"])
    parent_files = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert parent_files == {"checkpoint.pt", "config.yaml", "metrics.json", "eval_test.json"}
    assert {a.path for a in client.list_artifacts(by_name["text"].info.run_id)} >= {"checkpoint.pt", "metrics.json"}
    assert parent.data.params["train.schedule"] == "async" and parent.data.tags["dataset"] == "ucm_subset"


def test_cli_schedule_and_eval_split_reach_the_job(monkeypatch, subset, tmp_path):
    from cluster.cli.main import main

    seen = {}

    def fake_run(config, data_dir, out, **kwargs):  # only the flag handling is under test here
        seen.update(config=config, **kwargs)
        return {"train_seconds": 0, "best_epoch": 1, "mlflow_run_id": None}

    monkeypatch.setattr("training.jobs.run_training", fake_run)
    assert main(["train", "--config", "fast", "--data", str(subset), "--out", str(tmp_path / "x"),
                 "--schedule", "async", "--eval-split", "none"]) == 0
    assert seen["config"].train.schedule == "async" and seen["eval_split"] is None
    assert main(["train", "--config", "fast", "--data", str(subset), "--out", str(tmp_path / "x")]) == 0
    assert seen["config"].train.schedule == "joint" and seen["eval_split"] == "test"
