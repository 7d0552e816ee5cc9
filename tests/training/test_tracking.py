"""MLflow tracking of fit against a real `mlflow server` on loopback and the embedded SQLite store."""
from __future__ import annotations

import json
import sys
import math
import re
from pathlib import Path

import pytest
import yaml

pytest.importorskip("mlflow")
pytest.importorskip("codecarbon")
from mlflow import MlflowClient  # noqa: E402

from cluster.cli.main import main  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402
from training.config import ConfigError, TrackingConfig, config_from_dict  # noqa: E402
from serving.ingest.dataset import load_dataset  # noqa: E402
from serving.model.registry import resolve_tracking_uri  # noqa: E402
from training.tracking import git_commit, track_run  # noqa: E402
from training.train import fit  # noqa: E402

@pytest.fixture
def server(mlflow_server):
    return mlflow_server


def test_fit_logs_everything_to_a_server(server, subset, tiny_text_encoder, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")  # the run is seconds long
    config = config_from_dict(tiny_config(tiny_text_encoder, tracking={"tracking_uri": server}))
    out = tmp_path / "run"
    metrics = fit(config, subset, out, cache_dir=tmp_path / "cache", progress=False)
    client = MlflowClient(server)
    run = client.get_run(metrics["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny-16bits"
    assert json.loads((out / "metrics.json").read_text())["mlflow_run_id"] == run.info.run_id

    params, tags, logged = run.data.params, run.data.tags, run.data.metrics
    assert params["train.bits"] == "16" and params["train.epochs"] == "4"
    assert params["image.backbone"] == "test_efficientnet" and params["loss.weights.margin"] == "0.5"
    assert params["image.encode_views"] == "[0, 5]" and params["tracking.country_iso_code"] == "FRA"
    assert tags["dataset"] == "ucm_subset"
    assert tags["dataset.fingerprint"] == load_dataset(subset).fingerprint() == metrics["dataset_fingerprint"]
    assert tags["mlflow.source.git.commit"] == git_commit()
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", tags["mlflow.source.git.commit"])

    # One loss point per epoch, val figures at the evaluated epochs (2 and 4), equal to metrics.json.
    history = metrics["history"]
    losses = sorted(client.get_metric_history(run.info.run_id, "loss/total"), key=lambda m: m.step)
    assert [m.step for m in losses] == [1, 2, 3, 4]
    assert [m.value for m in losses] == pytest.approx([e["loss"]["total"] for e in history])
    assert {f"loss/{term}" for term in history[0]["loss"]} <= set(logged)
    for key, path in (("val/binary/image_to_image/map_all", ("binary", "image_to_image", "map_all")),
                      ("val/float/mr", ("float", "mr"))):
        points = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
        assert [m.step for m in points] == [2, 4]
        for point in points:
            figure = history[point.step - 1]["val"]
            for part in path:
                figure = figure[part]
            assert point.value == pytest.approx(figure)
    assert any(key.startswith("system/") for key in logged)

    # Energy and CO2: positive, finite, per 1,000 images = 12 train images x 4 epochs, and how measured.
    for key in ("energy_kwh", "emissions_kg_co2eq", "energy_kwh_per_1k_images", "emissions_kg_per_1k_images"):
        assert math.isfinite(logged[key]) and logged[key] > 0, key
    assert logged["energy_kwh_per_1k_images"] == pytest.approx(logged["energy_kwh"] * 1000 / 48)
    assert logged["emissions_kg_per_1k_images"] == pytest.approx(logged["emissions_kg_co2eq"] * 1000 / 48)
    assert params["energy.images_processed"] == "48"
    assert params["energy.country_iso_code"] == "FRA" and float(params["energy.pue"]) == 1.0
    assert "cpu: " in params["energy.method"] and "ram: " in params["energy.method"]
    assert tags["energy.source"] in ("measured", "estimated", "partly estimated")

    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"checkpoint.pt", "config.yaml", "metrics.json"}
    downloaded = client.download_artifacts(run.info.run_id, "metrics.json", str(tmp_path / "download"))
    assert Path(downloaded).read_bytes() == (out / "metrics.json").read_bytes()


def test_default_store_is_sqlite_in_working_directory(subset, tiny_text_encoder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = config_from_dict(tiny_config(tiny_text_encoder, epochs=2, tracking={"system_metrics": False}))
    metrics = fit(config, subset, tmp_path / "run", cache_dir=tmp_path / "cache", progress=False)
    assert (tmp_path / "mlruns.db").is_file()
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}").get_run(metrics["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.params["train.epochs"] == "2"
    assert run.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())
    assert (tmp_path / "mlartifacts" / run.info.run_id / "artifacts" / "checkpoint.pt").is_file()
    assert not any(key.startswith("system/") for key in run.data.metrics)  # system_metrics: false


def test_no_track_creates_no_run(subset, tiny_text_encoder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(tiny_config(tiny_text_encoder, epochs=2, tracking={"enabled": True})))
    assert main(["train", "--config", str(config_file), "--data", str(subset), "--out", str(tmp_path / "run"),
                 "--cache-dir", str(tmp_path / "cache"), "--no-track"]) == 0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["mlflow_run_id"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "run", "tiny.yaml"]  # no mlruns.db, no mlartifacts


def test_cli_tracking_uri_reaches_the_config(monkeypatch, subset, tmp_path):
    seen = {}

    def fake_run(config, *args, **kwargs):  # only the flag handling is under test here
        seen["config"] = config
        return {"train_seconds": 0, "best_epoch": 1, "mlflow_run_id": None}

    monkeypatch.setattr("training.jobs.run_training", fake_run)
    assert main(["train", "--config", "fast", "--data", str(subset), "--out", str(tmp_path / "x"),
                 "--tracking-uri", "http://127.0.0.1:1"]) == 0
    assert seen["config"].tracking.tracking_uri == "http://127.0.0.1:1" and seen["config"].tracking.enabled


def test_other_ranks_log_nothing(server, subset, tmp_path):
    config = config_from_dict({"name": "rank1", "tracking": {"tracking_uri": server, "experiment": "rank-test"}})
    with track_run(config, tmp_path, load_dataset(subset), images_processed=10, rank=1) as tracker:
        tracker.log_epoch(1, {"total": 1.0}, {"binary": {"mr": 5.0}})
    assert tracker.run_id is None
    assert MlflowClient(server).get_experiment_by_name("rank-test") is None


def test_failed_block_ends_the_run_failed_with_its_energy(server, subset, tmp_path):
    config = config_from_dict({"name": "broken", "tracking": {"tracking_uri": server, "experiment": "failures",
                                                               "system_metrics": False}})
    with pytest.raises(RuntimeError, match="diverged"):
        with track_run(config, tmp_path, load_dataset(subset), images_processed=10) as tracker:
            tracker.log_epoch(1, {"total": 2.0})
            raise RuntimeError("diverged")
    run = MlflowClient(server).get_run(tracker.run_id)
    assert run.info.status == "FAILED"
    assert run.data.metrics["loss/total"] == 2.0 and run.data.metrics["energy_kwh"] >= 0
    assert MlflowClient(server).list_artifacts(tracker.run_id) == []  # nothing half-written is logged


def test_missing_mlflow_stops_fit_before_any_work(monkeypatch, subset, tiny_text_encoder, tmp_path):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    config = config_from_dict(tiny_config(tiny_text_encoder, tracking={"enabled": True}))
    with pytest.raises(ImportError, match=re.escape("pip install terrahash[track]")):
        fit(config, subset, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_unknown_country_stops_fit_before_any_work(subset, tiny_text_encoder, tmp_path):
    config = config_from_dict(tiny_config(tiny_text_encoder, tracking={"country_iso_code": "FR"}))
    with pytest.raises(ValueError, match="country_iso_code.*'FR'"):
        fit(config, subset, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_tracking_uri_resolution(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(TrackingConfig().tracking_uri) == (f"sqlite:///{tmp_path / 'mlruns.db'}",
                                                                   (tmp_path / "mlartifacts").as_uri())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert resolve_tracking_uri(TrackingConfig().tracking_uri) == ("http://env:5000", None)
    assert resolve_tracking_uri("http://config:5000") == ("http://config:5000", None)


def test_tracking_section_is_checked():
    with pytest.raises(ConfigError, match=r"config.tracking: unknown key\(s\) \['uri'\]"):
        config_from_dict({"tracking": {"uri": "http://x"}})
    with pytest.raises(ConfigError, match="config.tracking.pue: expected float"):
        config_from_dict({"tracking": {"pue": "1.2"}})
    assert config_from_dict({"tracking": {"pue": 2}}).tracking.pue == 2.0


def test_git_commit_outside_a_checkout_is_unknown(tmp_path):
    assert git_commit(tmp_path) == "unknown"
