"""The text-encoder probe: its kNN vote, what fine-tuning trains, and its figures on a tiny model."""
from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from evaluation.text_probe import _main, _Probe, knn_vote, run_probe
from tests.conftest import tiny_config

CLASSES = ["agricultural", "airplane", "baseballdiamond"]


def test_knn_vote_takes_the_most_common_class_of_the_nearest_rows():
    train = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [0.2, 0.8]], dtype=np.float32)
    labels = np.array([0, 0, 1, 1, 2])
    queries = np.array([[1, 0.05], [0.05, 1]], dtype=np.float32)
    assert knn_vote(train, labels, queries, k=1, num_classes=3).tolist() == [0, 1]
    # The 3 nearest to the second query are rows 3, 2, 4: classes 1, 1, 2.
    assert knn_vote(train, labels, queries, k=3, num_classes=3).tolist() == [0, 1]
    # Row 4 alone nearest to a query along it: class 2.
    assert knn_vote(train, labels, np.array([[0.2, 0.8]], dtype=np.float32), k=1, num_classes=3).tolist() == [2]


@pytest.fixture(scope="module")
def probe_config(tiny_text_encoder, tmp_path_factory):
    config = tiny_config(tiny_text_encoder)
    config["train"]["captions"] = {"variants": 2, "synonym": 0.7, "feature_noise": 0.1}
    path = tmp_path_factory.mktemp("probe") / "tiny_probe.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def query_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("queries")
    sets = {"val_q": ["furrowed farm fields", "jets at the gates", "a softball infield"],
            "test_q": ["crops growing in rows", "airliners on the apron", "bases and a pitcher's mound"]}
    for name, texts in sets.items():
        (folder / f"{name}.json").write_text(json.dumps({
            "name": name, "classes": CLASSES,
            "queries": [{"text": t, "class": c} for t, c in zip(texts, CLASSES)]}))
    return [str(folder / "val_q.json"), str(folder / "test_q.json")]


def test_fine_tuning_trains_only_the_top_layers(probe_config):
    import torch

    from training.config import load_config
    from training.models import TextEncoder

    encoder = TextEncoder(load_config(probe_config).text)
    layers = encoder.model.encoder.layer
    before = [{k: v.clone() for k, v in layer.state_dict().items()} for layer in layers]
    probe = _Probe(encoder, 3, (16,), 0.1, 1, encoder_lr=1e-2, lr=1e-2, noise=None, seed=0)
    texts = ["a field of crops", "planes at an airport", "a baseball diamond", "rows of green crops"]
    probe.epoch(texts, np.array([0, 1, 2, 0]), batch_size=2, rng=np.random.default_rng(0))
    assert all(torch.equal(v, layers[0].state_dict()[k]) for k, v in before[0].items())
    assert any(not torch.equal(v, layers[1].state_dict()[k]) for k, v in before[1].items())
    with pytest.raises(ValueError, match="only 2 layers"):
        _Probe(encoder, 3, (16,), 0.1, 3, 1e-2, 1e-2, None, 0)


def test_the_probe_reports_each_setting_at_the_epoch_the_first_set_chooses(subset, probe_config, query_files):
    result = run_probe(subset, str(probe_config), layers=(0, 1), epochs=2, query_sets=query_files, ks=(1, 3),
                       encoder_lr=1e-3, progress=lambda line: None)
    assert result["train_texts"] == 12 * 5 * 3  # 12 train images x 5 captions, each with 2 variants
    assert set(result["knn"]) == {"val_q", "test_q"} and set(result["knn"]["val_q"]) == {"1", "3"}
    for setting in result["classifier"]:
        history = setting["epochs"]
        assert [h["epoch"] for h in history] == [1, 2]
        assert set(history[0]["accuracy"]) == {"val captions", "val_q", "test_q"}
        assert all(0 <= v <= 1 for h in history for v in h["accuracy"].values())
        best = max(h["accuracy"]["val_q"] for h in history)
        assert setting["chosen"]["accuracy"]["val_q"] == best and setting["chosen_by"] == "val_q"


def test_the_cli_refuses_a_dataset_without_captions_and_bad_epochs(tmp_path, ucm_dir, capsys):
    for name in ("agricultural", "airplane"):  # an image-only set in the class-folder layout
        folder = tmp_path / "images" / name
        folder.mkdir(parents=True)
        for source in sorted((ucm_dir / "images" / name).iterdir())[:2]:
            (folder / source.name).write_bytes(source.read_bytes())
    assert _main(["--data", str(tmp_path / "images")]) == 2
    assert "no captions" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _main(["--data", str(tmp_path), "--epochs", "0"])
