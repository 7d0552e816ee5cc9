"""``terrahash eval``: which database each query split is ranked against."""
from __future__ import annotations

import pytest
import torch

from evaluation.evaluate import evaluate_model
from evaluation.retrieval import database_splits
from tests.conftest import tiny_config
from training.config import config_from_dict
from training.train import CHECKPOINT, fit


def test_database_splits_never_put_test_items_in_the_val_database():
    assert database_splits("val") == ("train",)
    assert database_splits("test") == ("train", "val")
    with pytest.raises(ValueError, match="unknown query split"):
        database_splits("Test")


@pytest.fixture(scope="module")
def trained(subset, tiny_text_encoder, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    fit(config_from_dict(tiny_config(tiny_text_encoder, epochs=2)), subset, out / "run", cache_dir=out / "cache",
        progress=False)
    return out


def test_eval_on_val_ranks_against_train_only_as_checkpoint_selection_does(trained, subset):
    report = evaluate_model(trained / "run", subset, "val", cache_dir=trained / "cache", device="cpu")
    assert report["database"] == {"splits": ["train"], "images": 12}  # 3 classes x 4 train images
    # The figures the checkpoint was chosen by, measured the same way again.
    chosen = torch.load(trained / "run" / CHECKPOINT, weights_only=True)["val"]["binary"]
    for task in ("image_to_image", "text_to_image", "image_to_text"):
        assert report[task]["map_all"] == pytest.approx(chosen[task]["map_all"], abs=1e-9), task


def test_eval_on_test_ranks_against_train_and_val(trained, subset):
    report = evaluate_model(trained / "run", subset, "test", cache_dir=trained / "cache", device="cpu")
    assert report["database"] == {"splits": ["train", "val"], "images": 18}
