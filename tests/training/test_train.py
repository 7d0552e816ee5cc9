"""End to end on a handful of real images with tiny random models: train, select, save, evaluate."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cluster.cli.main import main
from evaluation.evaluate import evaluate_model
from tests.conftest import tiny_config, write_subset
from training.config import config_from_dict, load_config
from training.train import CHECKPOINT, fit, load_trained

TASKS = ("image_to_image", "text_to_image", "image_to_text")


def check_figures(figures: dict) -> None:
    for task in TASKS:
        for name, value in figures[task].items():
            upper = 100.0 if name.startswith("r") else 1.0
            assert 0.0 <= value <= upper, (task, name, value)
    assert 0.0 <= figures["mr"] <= 100.0


def test_fit_with_cached_features_then_eval(subset, tiny_text_encoder, tmp_path):
    config = config_from_dict(tiny_config(tiny_text_encoder))
    metrics = fit(config, subset, tmp_path / "run", cache_dir=tmp_path / "cache", progress=False)

    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert written["best_epoch"] in (2, 4)  # evaluated every 2 epochs
    assert len(written["history"]) == 4
    assert all(np.isfinite(e["loss"]["total"]) for e in written["history"])
    # Every epoch trains on each of the 12 train rows once, and says how long it took.
    assert all(e["samples"] == written["rows_per_worker"] == 12 and e["seconds"] > 0 for e in written["history"])
    assert set(written["history"][0]["loss"]) >= {"total", "hash_proxy", "self_distill", "contrastive", "alignment"}
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]["bits"] == 16
    assert metrics["val"] == written["val"]

    report = evaluate_model(tmp_path / "run", subset, "test", cache_dir=tmp_path / "cache", device="cpu")
    assert report["bits"] == 16
    check_figures(report)
    check_figures(report["float"])
    # 3 classes x 2 test images, 5 captions each: R@10 over 6 images must be 100%.
    assert report["text_to_image"]["r10"] == 100.0

    # The same checkpoint evaluated twice gives the same figures (deterministic encoding and ties).
    again = evaluate_model(tmp_path / "run", subset, "test", cache_dir=tmp_path / "cache", device="cpu")
    assert again["image_to_image"] == report["image_to_image"]


def test_same_seed_same_model(subset, tiny_text_encoder, tmp_path):
    config = config_from_dict(tiny_config(tiny_text_encoder, epochs=2))
    fit(config, subset, tmp_path / "a", cache_dir=tmp_path / "cache", progress=False)
    fit(config, subset, tmp_path / "b", cache_dir=tmp_path / "cache", progress=False)
    a = torch.load(tmp_path / "a" / CHECKPOINT, weights_only=True)["image_head"]
    b = torch.load(tmp_path / "b" / CHECKPOINT, weights_only=True)["image_head"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("freeze", [True, False])
def test_a_split_code_with_augmented_captions_trains_and_draws_the_same_per_seed(subset, tiny_text_encoder, tmp_path,
                                                                                 freeze):
    """instance_bits, duplicate positives and caption variants (cached features when the text
    encoder is frozen, reworded text through it otherwise), and a cached sensor view: the run
    trains, its proxies cover the class bits only, and the same seed gives the same model."""
    data = tiny_config(tiny_text_encoder, freeze=freeze, epochs=2)
    data["loss"] = {"instance_bits": 8, "duplicate_positives": True}
    data["train"]["captions"] = {"variants": 2, "feature_noise": 0.1}
    data["train"]["sensor_views"] = 1 if freeze else 0
    config = config_from_dict(data)
    fit(config, subset, tmp_path / "a", cache_dir=tmp_path / "cache", progress=False)
    fit(config, subset, tmp_path / "b", cache_dir=tmp_path / "cache", progress=False)
    a = torch.load(tmp_path / "a" / CHECKPOINT, weights_only=True)
    b = torch.load(tmp_path / "b" / CHECKPOINT, weights_only=True)
    assert a["objective"]["proxy.proxies"].shape == (3, 8)  # 16 bits, 8 of them instance bits
    assert all(torch.equal(a["text_head"][k], b["text_head"][k]) for k in a["text_head"])
    written = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert all(np.isfinite(e["loss"]["total"]) for e in written["history"])


def test_fine_tuning_path_trains_the_encoders(ucm_dir, tiny_text_encoder, tmp_path):
    """With the encoders unfrozen the teacher learns: its last epoch's loss is below its first, and against
    the same seed's untrained model (a learning rate too small to move a weight: the same initial weights
    through the same code) its encoders moved and its selected val mAP is higher. 30 train and 15 val
    images of 3 classes, enough for val mAP to tell the two apart."""
    data = write_subset(ucm_dir, tmp_path / "data", classes=3, per_split={"train": 10, "val": 5})
    raw = tiny_config(tiny_text_encoder, freeze=False, epochs=6)
    metrics = fit(config_from_dict(raw), data, tmp_path / "run", progress=False)
    losses = [epoch["loss"]["total"] for epoch in metrics["history"]]
    assert losses[-1] < losses[0], losses
    still = {**raw, "train": {**raw["train"], "lr": 1e-12, "backbone_lr": 1e-12}}
    untrained = fit(config_from_dict(still), data, tmp_path / "untrained", progress=False)

    state = torch.load(tmp_path / "run" / CHECKPOINT, weights_only=True)
    initial = torch.load(tmp_path / "untrained" / CHECKPOINT, weights_only=True)
    for tower in ("image_encoder", "text_encoder"):
        weights = [k for k in state[tower] if state[tower][k].is_floating_point() and "running" not in k]
        assert any(not torch.equal(state[tower][k], initial[tower][k]) for k in weights), f"{tower} did not move"
    model, _, _ = load_trained(tmp_path / "run")
    loaded = model.image_encoder.state_dict()
    assert all(torch.equal(state["image_encoder"][k], loaded[k]) for k in state["image_encoder"])
    learned, chance = (m["val"]["binary"]["image_to_image"]["map_all"] for m in (metrics, untrained))
    assert learned > chance, (learned, chance)
    report = evaluate_model(tmp_path / "run", data, "val", device="cpu")
    check_figures(report)


def test_cli_train_and_eval(subset, tiny_text_encoder, tmp_path, capsys):
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(tiny_config(tiny_text_encoder, epochs=2)))
    out = tmp_path / "run"
    assert main(["train", "--config", str(config_file), "--data", str(subset), "--out", str(out),
                 "--bits", "32", "--cache-dir", str(tmp_path / "cache")]) == 0
    assert main(["eval", "--model", str(out), "--data", str(subset), "--json", str(tmp_path / "eval.json"),
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["bits"] == 32  # the --bits override reached the model
    check_figures(report)
    table = capsys.readouterr().out
    assert "image_to_image.map_all" in table and "float" in table

    assert main(["summarize", str(tmp_path / "eval.json")]) == 0
    row = capsys.readouterr().out.strip().splitlines()[-1].split(" | ")
    assert row[0] == "| tiny" and row[1] == "32"
    assert row[2] == f"{report['image_to_image']['map_all']:.4f}"
    assert row[-1] == f"{report['float']['mr']:.1f} |"


def test_cli_reports_bad_config_key_clearly(tmp_path, subset, capsys):
    config_file = tmp_path / "bad.yaml"
    config_file.write_text("train:\n  epochz: 3\n")
    assert main(["train", "--config", str(config_file), "--data", str(subset), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "epochz" in err and "unknown key" in err
    assert not (tmp_path / "x").exists()  # nothing started, nothing written


def test_eval_without_checkpoint_fails_clearly(tmp_path, subset):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        evaluate_model(tmp_path, subset)


def test_shipped_configs_differ_where_they_should():
    fast, full = load_config("fast"), load_config("full")
    assert fast.image.freeze_backbone and not full.image.freeze_backbone
    assert fast.train.bits == full.train.bits == 64


def test_cli_corrupt_image_stops_or_is_skipped_and_listed(subset, tiny_text_encoder, tmp_path, capsys):
    document = json.loads((subset / "dataset_subset.json").read_text())
    victim = document["images"][0]
    broken = tmp_path / "broken"
    broken.mkdir()
    data = (Path(victim["filepath"]) / victim["filename"]).read_bytes()
    (broken / victim["filename"]).write_bytes(data[: len(data) // 2])  # truncated mid-scan
    victim["filepath"] = str(broken)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "dataset_broken.json").write_text(json.dumps(document))
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(tiny_config(tiny_text_encoder, epochs=2)))

    args = ["train", "--config", str(config_file), "--data", str(data_dir), "--no-cache"]
    assert main(args + ["--out", str(tmp_path / "stopped")]) == 2
    assert str(broken / victim["filename"]) in capsys.readouterr().err
    assert not (tmp_path / "stopped" / CHECKPOINT).exists()

    assert main(args + ["--out", str(tmp_path / "run"), "--skip-bad-images"]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [path for path, _ in metrics["skipped_images"]] == [str(broken / victim["filename"])]
