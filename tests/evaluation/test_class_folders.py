"""Class-folder datasets (``DIR/<class>/*.jpg|png|tif``, no JSON): the reader, its errors and
fingerprint, and ``terrahash eval`` on one end to end with a tiny model."""
from __future__ import annotations

import json
import logging
import re
import shutil

import pytest
from PIL import Image

from cluster.cli.main import main
from evaluation.evaluate import evaluate_model
from tests.conftest import tiny_config
from tests.evaluation.test_transfer import image_only_set
from training.config import config_from_dict
from serving.ingest.dataset import CLASS_FOLDERS, DatasetError, load_dataset
from training.train import fit

# Real UCM classes the tiny model never saw, under new names (it was trained on agricultural,
# airplane and baseballdiamond). In the order of the new names, so that a Karpathy JSON of the same
# images (image_only_set) lists them in the order the class folders are read in.
RENAMED = {"parkinglot": "car_park", "harbor": "marina", "forest": "woods"}


def ucm_files(ucm_dir, source_class: str, n: int):
    document = json.loads((ucm_dir / "dataset_ucm.json").read_text())
    entries = [e for e in document["images"] if e["class"] == source_class][:n]
    assert len(entries) == n
    return [ucm_dir / e["filepath"] / e["filename"] for e in entries]


def class_folders(ucm_dir, folder, per_class=4, names=RENAMED):
    """A few real UCM images copied into ``folder/<new class>/<new class>_<n>.jpg``."""
    for source, name in names.items():
        (folder / name).mkdir(parents=True)
        for n, path in enumerate(ucm_files(ucm_dir, source, per_class)):
            shutil.copyfile(path, folder / name / f"{name}_{n}.jpg")
    return folder


def flip_a_byte(path, at=1000):
    data = bytearray(path.read_bytes())
    data[at] ^= 1
    path.write_bytes(bytes(data))


# --------------------------------------------------------------------------- the reader


def test_a_folder_of_class_folders_is_read_as_an_image_only_set_without_splits(ucm_dir, tmp_path):
    folder = class_folders(ucm_dir, tmp_path / "scenes")
    dataset = load_dataset(folder)
    assert dataset.layout == CLASS_FOLDERS and dataset.name == "scenes" and dataset.json_path == folder
    assert dataset.classes == ("car_park", "marina", "woods")
    assert [(r.path.parent.name, r.path.name) for r in dataset.records] == [
        (c, f"{c}_{n}.jpg") for c in ("car_park", "marina", "woods") for n in range(4)]
    assert [r.index for r in dataset.records] == list(range(12))
    assert all(r.captions == () and r.split is None and r.label == r.path.parent.name for r in dataset.records)
    assert not dataset.has_splits and dataset.split("test") == []


def test_training_on_class_folders_fails_naming_the_folder(ucm_dir, tmp_path, tiny_text_encoder):
    folder = class_folders(ucm_dir, tmp_path / "scenes", per_class=1)
    with pytest.raises(DatasetError, match=re.escape(str(folder)) + ": training needs captions") as info:
        load_dataset(folder).require_captions(("train", "val"), "training")
    assert "3 of its 3 images have no caption" in str(info.value) and "no image is in a split" in str(info.value)
    config = config_from_dict(tiny_config(tiny_text_encoder, epochs=1))
    with pytest.raises(DatasetError, match="training needs captions"):
        fit(config, folder, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_png_tiff_nested_folders_and_upper_case_names_are_read_hidden_and_other_files_are_not(ucm_dir, tmp_path):
    jpeg, png, tiff = ucm_files(ucm_dir, "forest", 3)
    (tmp_path / "trees" / "north" / "deep").mkdir(parents=True)
    (tmp_path / "water").mkdir()
    shutil.copyfile(jpeg, tmp_path / "trees" / "b.JPG")
    Image.open(png).save(tmp_path / "trees" / "north" / "a.png")
    Image.open(tiff).save(tmp_path / "trees" / "north" / "deep" / "c.tif")
    shutil.copyfile(jpeg, tmp_path / "water" / "w.jpeg")
    Image.open(png).save(tmp_path / "water" / "x.TIFF")
    # Left out: hidden files and folders, other kinds of files, files next to the class folders.
    shutil.copyfile(jpeg, tmp_path / "trees" / ".hidden.jpg")
    (tmp_path / "trees" / ".thumbnails").mkdir()
    shutil.copyfile(jpeg, tmp_path / "trees" / ".thumbnails" / "t.jpg")
    (tmp_path / ".cache").mkdir()
    shutil.copyfile(jpeg, tmp_path / ".cache" / "z.jpg")
    (tmp_path / "trees" / "notes.txt").write_text("not an image")
    (tmp_path / "manifest.json").write_text("{}")
    dataset = load_dataset(tmp_path)
    assert [r.path.relative_to(tmp_path).as_posix() for r in dataset.records] == [
        "trees/b.JPG", "trees/north/a.png", "trees/north/deep/c.tif", "water/w.jpeg", "water/x.TIFF"]
    assert [r.label for r in dataset.records] == ["trees"] * 3 + ["water"] * 2


def test_a_folder_with_a_dataset_json_is_read_by_its_json_not_its_folders(ucm_dir, tmp_path):
    folder = class_folders(ucm_dir, tmp_path)
    (folder / "dataset_two.json").write_text(json.dumps({"images": [
        {"filename": "woods_0.jpg", "filepath": "woods", "class": "woods"},
        {"filename": "marina_0.jpg", "filepath": "marina", "class": "marina"}]}))
    dataset = load_dataset(folder)
    assert dataset.layout == "karpathy" and len(dataset.records) == 2


@pytest.mark.parametrize("content", ["empty", "text-files", "loose-images", "empty-class-folders"])
def test_a_folder_in_neither_layout_is_an_error_naming_both(ucm_dir, tmp_path, content):
    image = ucm_files(ucm_dir, "forest", 1)[0]
    if content == "text-files":
        (tmp_path / "woods").mkdir()
        (tmp_path / "woods" / "readme.txt").write_text("images elsewhere")
        (tmp_path / "captions.json").write_text("{}")
    elif content == "loose-images":
        shutil.copyfile(image, tmp_path / "a.jpg")
    elif content == "empty-class-folders":
        (tmp_path / "woods").mkdir()
        (tmp_path / "marina").mkdir()
    with pytest.raises(DatasetError) as info:
        load_dataset(tmp_path)
    message = str(info.value)
    assert message.startswith(f"{tmp_path}: ") and "accepted layouts" in message
    assert "dataset*.json" in message and "DIR/<class>/" in message
    assert ("1 image(s) lie directly in it" in message) == (content == "loose-images")


def test_one_class_folder_is_an_error_pointing_at_its_subfolders(ucm_dir, tmp_path):
    # UC Merced's own release: UCMerced_LandUse/Images/<class>/*.tif; given the top folder, one "class".
    class_folders(ucm_dir, tmp_path / "Images")
    with pytest.raises(DatasetError, match="one class folder only .'Images'.") as info:
        load_dataset(tmp_path)
    assert str(tmp_path / "Images") in str(info.value)
    assert len(load_dataset(tmp_path / "Images").classes) == 3


def test_folders_without_images_are_not_classes_and_are_reported(ucm_dir, tmp_path, caplog):
    folder = class_folders(ucm_dir, tmp_path, per_class=1)
    (folder / "empty").mkdir()
    with caplog.at_level(logging.WARNING, logger="serving.ingest.dataset"):
        dataset = load_dataset(folder)
    assert "empty" not in dataset.classes and len(dataset.classes) == 3
    assert any("without images" in r.getMessage() and "empty" in r.getMessage() for r in caplog.records)


def test_an_unreadable_image_is_named_or_skipped_and_listed(ucm_dir, tmp_path):
    folder = class_folders(ucm_dir, tmp_path)
    bad = folder / "marina" / "marina_2.jpg"
    bad.write_bytes(bad.read_bytes()[:300])
    (folder / "woods" / "woods_9.png").write_text("not a png")
    with pytest.raises(DatasetError) as info:
        load_dataset(folder)
    message = str(info.value)
    assert message.startswith(f"{folder}: 2 image(s) cannot be used")
    assert str(bad) in message and str(folder / "woods" / "woods_9.png") in message and "unreadable" in message
    dataset = load_dataset(folder, skip_bad_images=True)
    assert len(dataset.records) == 11 and bad not in [r.path for r in dataset.records]
    assert {p for p, _ in dataset.skipped} == {str(bad), str(folder / "woods" / "woods_9.png")}
    assert [r.index for r in dataset.records] == list(range(11))


def test_the_fingerprint_is_of_the_files_paths_and_bytes(ucm_dir, tmp_path):
    folder = class_folders(ucm_dir, tmp_path / "a")
    first = load_dataset(folder).fingerprint()
    assert re.fullmatch(r"[0-9a-f]{16}", first)
    assert load_dataset(folder).fingerprint() == first  # loaded again
    assert load_dataset(shutil.copytree(folder, tmp_path / "b")).fingerprint() == first  # a copy elsewhere
    # A skipped image still counts: it is one of the set's files.
    assert load_dataset(folder, skip_bad_images=True).fingerprint() == first

    changes = {
        "bytes": lambda f: flip_a_byte(f / "woods" / "woods_1.jpg"),
        "renamed": lambda f: (f / "woods" / "woods_1.jpg").rename(f / "woods" / "woods_7.jpg"),
        "other class": lambda f: (f / "woods" / "woods_1.jpg").rename(f / "marina" / "woods_1.jpg"),
        "added": lambda f: shutil.copyfile(f / "woods" / "woods_1.jpg", f / "woods" / "extra.jpg"),
        "removed": lambda f: (f / "woods" / "woods_1.jpg").unlink(),
    }
    seen = {first}
    for n, (name, change) in enumerate(changes.items()):
        copy = shutil.copytree(folder, tmp_path / f"c{n}")
        change(copy)
        fingerprint = load_dataset(copy, check_images=False).fingerprint()
        assert fingerprint not in seen, name
        seen.add(fingerprint)
    # The JSON layout of the same images has its own fingerprint (of its annotation file).
    assert load_dataset(image_only_set(ucm_dir, tmp_path / "json", names=RENAMED)).fingerprint() not in seen


# --------------------------------------------------------------------------- terrahash eval end to end


def test_terrahash_eval_on_class_folders_is_a_leave_one_out_transfer_figure(trained, ucm_dir, tmp_path, capsys):
    folder = class_folders(ucm_dir, tmp_path / "scenes")
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(trained / "run"), "--data", str(folder), "--cache-dir",
                 str(trained / "cache"), "--device", "cpu", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["dataset"] == "scenes" and report["classes"] == ["car_park", "marina", "woods"]
    assert report["dataset_fingerprint"] == load_dataset(folder).fingerprint()
    assert report["transfer"] is True and "classes differ" in report["transfer_reasons"][0]
    assert report["database"]["rule"] == "leave_one_out" and report["database"]["images"] == 12
    assert report["database"]["queries"] == 12
    for kind in (report, report["asymmetric"], report["float"]):
        assert all(0.0 <= v <= 1.0 for v in kind["image_to_image"].values())
        assert kind["text_to_image"] is None and kind["image_to_text"] is None
    assert "TRANSFER" in printed and "leave-one-out" in printed
    # The same images in the same order, through a Karpathy JSON: the same figures.
    same = evaluate_model(trained / "run", image_only_set(ucm_dir, tmp_path / "json", names=RENAMED),
                          cache_dir=trained / "cache", device="cpu")
    for key in ("image_to_image",):
        assert report[key] == same[key]
        assert report["asymmetric"][key] == same["asymmetric"][key] and report["float"][key] == same["float"][key]


def test_terrahash_eval_on_class_folders_with_a_bad_image(trained, ucm_dir, tmp_path, capsys):
    folder = class_folders(ucm_dir, tmp_path / "scenes")
    bad = folder / "woods" / "woods_3.jpg"
    bad.write_text("not a jpeg")
    args = ["eval", "--model", str(trained / "run"), "--data", str(folder), "--cache-dir", str(trained / "cache"),
            "--device", "cpu", "--json", str(tmp_path / "eval.json")]
    assert main(args) == 2
    assert str(bad) in capsys.readouterr().err
    assert main(args + ["--skip-bad-images"]) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["database"]["images"] == 11 and [p for p, _ in report["skipped_images"]] == [str(bad)]


def test_eval_help_names_both_layouts(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "dataset*.json" in text and "one subfolder per class" in text and "evaluation.transfer_set" in text
