"""``terrahash eval``: which database each query split is ranked against, and what the report holds."""
from __future__ import annotations

import pytest
import torch

from evaluation.evaluate import evaluate_model
from evaluation.retrieval import database_splits
from training.train import CHECKPOINT

TASKS = ("image_to_image", "text_to_image", "image_to_text")


def test_database_splits_never_put_test_items_in_the_val_database():
    assert database_splits("val") == ("train",)
    assert database_splits("test") == ("train", "val")
    with pytest.raises(ValueError, match="unknown query split"):
        database_splits("Test")


def test_eval_on_val_ranks_against_train_only_as_checkpoint_selection_does(trained, subset):
    report = evaluate_model(trained / "run", subset, "val", cache_dir=trained / "cache", device="cpu")
    assert report["database"]["rule"] == "splits"
    assert (report["database"]["splits"], report["database"]["images"]) == (["train"], 12)  # 3 classes x 4 train
    assert (report["database"]["queries"], report["database"]["query_captions"]) == (6, 30)
    # The figures the checkpoint was chosen by, measured the same way again.
    chosen = torch.load(trained / "run" / CHECKPOINT, weights_only=True)["val"]["binary"]
    for task in TASKS:
        assert report[task]["map_all"] == pytest.approx(chosen[task]["map_all"], abs=1e-9), task


def test_eval_on_test_ranks_against_train_and_val(trained, subset):
    report = evaluate_model(trained / "run", subset, "test", cache_dir=trained / "cache", device="cpu")
    assert (report["database"]["splits"], report["database"]["images"]) == (["train", "val"], 18)
    # Its own training data: not a transfer figure.
    assert report["transfer"] is False and report["transfer_reasons"] == []
    assert report["trained_on"]["dataset_fingerprint"] == report["dataset_fingerprint"]


def test_the_report_has_binary_asymmetric_and_float_figures_of_the_same_shape(trained, subset):
    report = evaluate_model(trained / "run", subset, "test", cache_dir=trained / "cache", device="cpu")
    for kind in (report, report["asymmetric"], report["float"]):
        assert set(kind["image_to_image"]) == {"map_all", "map_50", "p_at_10"}
        assert set(kind["text_to_image"]) == set(kind["image_to_text"]) == {"map_all", "r1", "r5", "r10"}
        for task in TASKS:
            for name, value in kind[task].items():
                assert 0.0 <= value <= (100.0 if name.startswith("r") else 1.0), (task, name, value)
        assert 0.0 <= kind["mr"] <= 100.0
    # The ceiling of the split's captions: R@K can never beat it.
    ceiling = report["recall_ceiling"]
    assert ceiling["captions"] == 30
    for kind in (report, report["asymmetric"], report["float"]):
        for k in ("r1", "r5", "r10"):
            assert kind["text_to_image"][k] <= ceiling[k] + 1e-9
