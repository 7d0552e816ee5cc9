"""Transfer evaluation: a model measured on another labelled dataset than its training one, including
image-only sets and sets without splits; and training refusing caption-less sets clearly."""
from __future__ import annotations

import json
import shutil

import pytest

from cluster.cli.main import main
from evaluation.evaluate import evaluate_model
from tests.conftest import tiny_config
from training.config import config_from_dict
from serving.ingest.dataset import DatasetError, load_dataset
from training.train import fit

# Real UCM classes the tiny model never saw, under new names (it was trained on agricultural,
# airplane and baseballdiamond).
RENAMED = {"forest": "woods", "harbor": "marina", "parkinglot": "car_park"}


def image_only_set(ucm_dir, folder, per_class=4, splits=None, sentences="missing", names=RENAMED):
    """A few real UCM images copied into ``folder`` under new class names, in a Karpathy JSON without
    captions (``sentences``: "missing" or "empty"), with ``splits`` (a list per class) or no split field."""
    document = json.loads((ucm_dir / "dataset_ucm.json").read_text())
    (folder / "pictures").mkdir(parents=True)
    entries = []
    for source, name in names.items():
        files = [e for e in document["images"] if e["class"] == source][:per_class]
        for n, e in enumerate(files):
            target = f"{name}_{n}.jpg"
            shutil.copyfile(ucm_dir / e["filepath"] / e["filename"], folder / "pictures" / target)
            entry = {"filename": target, "filepath": "pictures", "class": name}
            if sentences == "empty":
                entry["sentences"] = []
            if splits:
                entry["split"] = splits[n]
            entries.append(entry)
    (folder / "dataset_transfer.json").write_text(json.dumps({"dataset": "ucm_renamed", "images": entries}))
    return folder


# --------------------------------------------------------------------------- the reader


@pytest.mark.parametrize("sentences", ["missing", "empty"])
def test_the_reader_accepts_image_only_labelled_sets(ucm_dir, tmp_path, sentences):
    dataset = load_dataset(image_only_set(ucm_dir, tmp_path, sentences=sentences))
    assert len(dataset.records) == 12 and all(r.captions == () for r in dataset.records)
    assert dataset.classes == ("car_park", "marina", "woods")
    assert not dataset.has_splits and all(r.split is None for r in dataset.records)
    assert dataset.split("test") == [] and len(dataset.without_captions()) == 12


def test_split_given_for_some_images_only_is_an_error(ucm_dir, tmp_path):
    folder = image_only_set(ucm_dir, tmp_path, per_class=2, splits=["train", "test"])
    path = folder / "dataset_transfer.json"
    document = json.loads(path.read_text())
    del document["images"][1]["split"]
    path.write_text(json.dumps(document))
    with pytest.raises(DatasetError, match="1 images have no 'split' while others do") as info:
        load_dataset(folder)
    assert str(path) in str(info.value)


def test_training_on_a_set_without_captions_fails_naming_the_file(ucm_dir, tmp_path, tiny_text_encoder):
    folder = image_only_set(ucm_dir, tmp_path / "data", per_class=3, splits=["train", "val", "test"])
    config = config_from_dict(tiny_config(tiny_text_encoder, epochs=1))
    with pytest.raises(DatasetError, match="training needs captions") as info:
        fit(config, folder, tmp_path / "run", progress=False)
    message = str(info.value)
    assert str(folder / "dataset_transfer.json") in message and "woods_0.jpg" in message
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    # The CLI says it in one line.
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(json.dumps(tiny_config(tiny_text_encoder, epochs=1)))  # JSON is YAML
    assert main(["train", "--config", str(config_file), "--data", str(folder), "--out", str(tmp_path / "cli"),
                 "--no-track"]) == 2


# --------------------------------------------------------------------------- transfer figures


def test_image_only_transfer_set_without_splits_is_evaluated_leave_one_out(trained, ucm_dir, tmp_path, capsys):
    folder = image_only_set(ucm_dir, tmp_path / "data")
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(trained / "run"), "--data", str(folder), "--cache-dir",
                 str(trained / "cache"), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["transfer"] is True and "classes differ" in report["transfer_reasons"][0]
    assert report["trained_on"]["classes"] == ["agricultural", "airplane", "baseballdiamond"]
    assert report["classes"] == ["car_park", "marina", "woods"]
    assert report["database"]["rule"] == "leave_one_out" and report["database"]["images"] == 12
    assert "no images" in report["database"]["why"]
    for kind in (report, report["asymmetric"], report["float"]):
        assert set(kind["image_to_image"]) == {"map_all", "map_50", "p_at_10"}
        assert all(0.0 <= v <= 1.0 for v in kind["image_to_image"].values())
        assert kind["text_to_image"] is None and kind["image_to_text"] is None and kind["mr"] is None
    assert report["recall_ceiling"] is None
    assert "TRANSFER" in printed and "ucm_subset" in printed and "ucm_renamed" in printed
    assert "leave-one-out" in printed and "no captions" in printed

    assert main(["summarize", str(out)]) == 0
    row = capsys.readouterr().out.strip().splitlines()[-1]
    assert "transfer" in row and f"{report['image_to_image']['map_all']:.4f}" in row and "| - |" in row


def test_relevance_comes_from_the_evaluated_datasets_own_classes(trained, ucm_dir, tmp_path):
    kwargs = dict(cache_dir=trained / "cache", device="cpu")
    renamed = evaluate_model(trained / "run", image_only_set(ucm_dir, tmp_path / "a"), **kwargs)
    # The same images under other names (sorted in another order): the same figures.
    other_names = {"forest": "z_trees", "harbor": "a_boats", "parkinglot": "m_cars"}
    again = evaluate_model(trained / "run", image_only_set(ucm_dir, tmp_path / "b", names=other_names), **kwargs)
    assert again["image_to_image"] == renamed["image_to_image"]
    # One class for all: every database image is relevant, whatever the codes.
    one = {"forest": "scene", "harbor": "scene", "parkinglot": "scene"}
    merged = evaluate_model(trained / "run", image_only_set(ucm_dir, tmp_path / "c", names=one), **kwargs)
    assert merged["image_to_image"] == {"map_all": 1.0, "map_50": 1.0, "p_at_10": 1.0}
    assert renamed["image_to_image"]["map_all"] < 1.0


def test_image_only_set_with_splits_uses_the_protocols_database(trained, ucm_dir, tmp_path):
    folder = image_only_set(ucm_dir, tmp_path, splits=["train", "train", "train", "test"])
    report = evaluate_model(trained / "run", folder, "test", cache_dir=trained / "cache", device="cpu")
    assert report["database"]["rule"] == "splits" and report["database"]["images"] == 9  # train (val is empty)
    assert report["database"]["queries"] == 3 and report["database"]["query_captions"] == 0
    # No val images: the val split's queries fall back to leave-one-out, and say why.
    val = evaluate_model(trained / "run", folder, "val", cache_dir=trained / "cache", device="cpu")
    assert val["database"]["rule"] == "leave_one_out" and "'val' has no images" in val["database"]["why"]


def test_same_classes_other_annotation_file_is_a_transfer_figure(trained, subset, tmp_path):
    document = json.loads((subset / "dataset_subset.json").read_text())
    document["dataset"] = "ucm_subset_copy"
    (tmp_path / "dataset_copy.json").write_text(json.dumps(document))
    report = evaluate_model(trained / "run", tmp_path, "test", cache_dir=trained / "cache", device="cpu")
    assert report["transfer"] is True and "dataset differs" in report["transfer_reasons"][0]
    assert report["text_to_image"] is not None  # it has captions: every figure is there
