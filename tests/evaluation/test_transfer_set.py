"""``python -m evaluation.transfer_set``: a split re-cut as another sensor and scale would see it,
written as a class-folder set; determinism, the transforms and their selection, the manifest, the
output folder's guards, and ``terrahash eval`` on the result."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from PIL import Image

from cluster.cli.main import main
from evaluation import transfer_set
from evaluation.transfer_set import (
    DEFAULT_SIZES,
    MANIFEST,
    TRANSFORMS,
    TransferSetError,
    build_transfer_set,
    corner_free_box,
    rotate,
)
from serving.ingest.dataset import CLASS_FOLDERS, load_dataset


def files_of(folder):
    """{relative path: bytes} of every file under ``folder``."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def recut(subset, tmp_path_factory):
    """The test split of the 3-class subset (2 images a class), every transform, seed 0."""
    out = tmp_path_factory.mktemp("recut") / "set"
    build_transfer_set(subset, out, "test", seed=0)
    return out


def manifest_of(folder):
    return json.loads((folder / MANIFEST).read_text())


# --------------------------------------------------------------------------- the set


def test_the_set_is_a_class_folder_set_of_every_class_of_the_split(recut, subset):
    source = load_dataset(subset)
    test = source.split("test")
    dataset = load_dataset(recut)  # manifest.json, next to the class folders, is not an image
    assert dataset.layout == CLASS_FOLDERS and not dataset.has_splits
    assert dataset.classes == tuple(sorted({r.label for r in test})) == source.classes
    assert len(dataset.records) == len(test) == 6
    manifest = manifest_of(recut)
    assert manifest["generator"] == "evaluation.transfer_set" and manifest["seed"] == 0
    assert manifest["transforms"] == list(TRANSFORMS) and manifest["source"]["split"] == "test"
    assert manifest["source"]["fingerprint"] == source.fingerprint()
    by_file = {e["file"]: e for e in manifest["images"]}
    assert sorted(by_file) == sorted(r.path.relative_to(recut).as_posix() for r in dataset.records)
    sources = {r.path.resolve() for r in test}
    root = source.json_path.parent.resolve()
    for record in dataset.records:
        entry = by_file[record.path.relative_to(recut).as_posix()]
        assert entry["class"] == record.label and (root / entry["source"]).resolve() in sources
        assert set(entry["transforms"]) == set(TRANSFORMS)
        with Image.open(record.path) as image:
            assert image.format == "PNG" and list(image.size) == entry["size"]
            assert min(image.size) == entry["transforms"]["size"]["short_side"] in DEFAULT_SIZES
        angle = entry["transforms"]["rotate"]["angle"]
        assert 0 < angle < 360 and angle % 90 != 0


def test_the_same_seed_gives_byte_identical_files_and_another_seed_other_ones(recut, subset, tmp_path):
    again = tmp_path / "again"
    build_transfer_set(subset, again, "test", seed=0)
    assert files_of(again) == files_of(recut)
    other = tmp_path / "other"
    build_transfer_set(subset, other, "test", seed=1)
    mine, theirs = files_of(recut), files_of(other)
    assert set(mine) == set(theirs)  # the same files, each transformed otherwise
    assert all(mine[name] != theirs[name] for name in mine)
    assert manifest_of(other)["images"][0]["transforms"] != manifest_of(recut)["images"][0]["transforms"]


def test_no_black_corners_after_the_rotation(recut):
    for path in sorted(recut.rglob("*.png")):
        image = pixels(path)
        for corner in (image[:2, :2], image[:2, -2:], image[-2:, :2], image[-2:, -2:]):
            assert corner.any(), path  # not all zero


@pytest.mark.parametrize("size", [(256, 256), (247, 247), (253, 256), (256, 249)])
@pytest.mark.parametrize("angle", [5.0, 30.0, 45.0, 89.5, 133.3, 271.0])
def test_the_rotation_keeps_no_pixel_of_the_fill(size, angle):
    # A flat grey image: any fill that survives the crop shows as a darker pixel on the border.
    flat = Image.new("RGB", size, (200, 180, 160))
    turned = np.asarray(rotate(flat, angle)).astype(int)
    assert turned.shape == (size[1], size[0], 3)
    border = np.concatenate([turned[0], turned[-1], turned[:, 0], turned[:, -1]])
    assert np.abs(border - np.asarray([200, 180, 160])).max() <= 1
    # The crop is the largest corner-free box less a small margin, not much smaller.
    left, top, right, bottom = corner_free_box(*size, angle)
    c, s = abs(math.cos(math.radians(angle))), abs(math.sin(math.radians(angle)))
    assert right - left >= size[0] * min(size[0] / (size[0] * c + size[1] * s),
                                         size[1] / (size[0] * s + size[1] * c)) - 8


def test_no_angle_leaves_fill_on_the_border():
    for size in ((256, 256), (247, 256)):
        flat = Image.new("RGB", size, (90, 90, 90))
        for angle in np.arange(0.5, 360.0, 1.3):
            turned = np.asarray(rotate(flat, float(angle)))
            border = np.concatenate([turned[0], turned[-1], turned[:, 0], turned[:, -1]])
            assert (border.min(), border.max()) == (90, 90), (size, angle)


# --------------------------------------------------------------------------- --transforms


def test_size_only_gives_the_source_images_resized(subset, tmp_path):
    out = tmp_path / "sized"
    build_transfer_set(subset, out, "test", seed=3, transforms=("size",), sizes=(224, 320))
    manifest = manifest_of(out)
    root = load_dataset(subset).json_path.parent
    sizes = set()
    for entry in manifest["images"]:
        assert list(entry["transforms"]) == ["size"]
        side = entry["transforms"]["size"]["short_side"]
        sizes.add(side)
        with Image.open(root / entry["source"]) as source:
            w, h = source.size
            scale = side / min(w, h)
            expected = source.convert("RGB").resize((round(w * scale), round(h * scale)), Image.Resampling.LANCZOS)
        assert np.array_equal(pixels(out / entry["file"]), np.asarray(expected)), entry["file"]
    assert sizes <= {224, 320}


def test_none_is_a_lossless_copy_and_each_transform_changes_the_pixels(subset, tmp_path):
    build_transfer_set(subset, tmp_path / "none", "test", transforms=())
    root = load_dataset(subset).json_path.parent
    originals = {}
    for entry in manifest_of(tmp_path / "none")["images"]:
        assert entry["transforms"] == {}
        originals[entry["file"]] = pixels(root / entry["source"])
        assert np.array_equal(pixels(tmp_path / "none" / entry["file"]), originals[entry["file"]])
    for name in ("zoom", "rotate", "colour", "blur"):
        build_transfer_set(subset, tmp_path / name, "test", transforms=(name,))
        for entry in manifest_of(tmp_path / name)["images"]:
            assert list(entry["transforms"]) == [name]
            changed = pixels(tmp_path / name / entry["file"])
            assert changed.shape == originals[entry["file"]].shape, name  # only size changes the size
            assert np.abs(changed.astype(int) - originals[entry["file"]]).mean() > 1.0, (name, entry["file"])


def test_a_subset_of_transforms_applies_the_same_draws(recut, subset, tmp_path):
    out = tmp_path / "geometry"
    build_transfer_set(subset, out, "test", seed=0, transforms=("rotate", "zoom"))
    full = {e["file"]: e["transforms"] for e in manifest_of(recut)["images"]}
    for entry in manifest_of(out)["images"]:
        assert entry["transforms"] == {"zoom": full[entry["file"]]["zoom"], "rotate": full[entry["file"]]["rotate"]}
        assert entry["size"] == entry["source_size"]
    assert manifest_of(out)["transforms"] == ["zoom", "rotate"]


def test_the_cli_parses_transforms_and_refuses_unknown_ones(subset, tmp_path, capsys):
    out = tmp_path / "cli"
    assert transfer_set._main(["--data", str(subset), "--split", "val", "--out", str(out), "--transforms",
                               "colour,blur,size", "--seed", "4", "--sizes", "96"]) == 0
    assert "wrote 6 images of 3 classes" in capsys.readouterr().out
    manifest = manifest_of(out)
    assert manifest["transforms"] == ["colour", "size", "blur"] and manifest["seed"] == 4
    assert manifest["source"]["split"] == "val" and manifest["sizes"] == [96]
    assert all(min(e["size"]) == 96 for e in manifest["images"])
    assert transfer_set._main(["--data", str(subset), "--out", str(tmp_path / "x"), "--transforms", "zoom,tilt"]) == 2
    assert "'tilt'" in capsys.readouterr().err and not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- the output folder


def test_the_source_is_never_written_to(ucm_dir, tmp_path):
    # A class-folder copy as the source, so that a failing guard could only write into tmp_path.
    source = tmp_path / "source"
    for cls in ("forest", "harbor"):
        shutil.copytree(ucm_dir / "images" / cls, source / cls, ignore=lambda d, names: sorted(names)[3:])
    before = files_of(source)
    for out in (source / "recut", source / "forest" / "recut", source, tmp_path):
        with pytest.raises(TransferSetError, match="never written to"):
            build_transfer_set(source, out, "all")
    assert files_of(source) == before and not (source / "recut").exists()
    build_transfer_set(source, tmp_path / "elsewhere", "all")  # a class-folder source needs --split all
    assert len(load_dataset(tmp_path / "elsewhere").records) == 6 and files_of(source) == before


def test_an_existing_folder_is_replaced_only_if_it_holds_a_set_and_overwrite_is_given(subset, tmp_path):
    out = tmp_path / "set"
    build_transfer_set(subset, out, "test", seed=0)
    with pytest.raises(TransferSetError, match="--overwrite"):
        build_transfer_set(subset, out, "test", seed=1)
    build_transfer_set(subset, out, "test", seed=1, overwrite=True)
    assert manifest_of(out)["seed"] == 1
    (out / "notes.txt").write_text("mine")
    with pytest.raises(TransferSetError, match="does not list"):
        build_transfer_set(subset, out, "test", seed=2, overwrite=True)
    other = tmp_path / "other"
    other.mkdir()
    (other / "photo.jpg").write_bytes(b"someone's")
    with pytest.raises(TransferSetError, match="not a set written by"):
        build_transfer_set(subset, other, "test", overwrite=True)
    assert (out / "notes.txt").exists() and manifest_of(out)["seed"] == 1 and (other / "photo.jpg").exists()
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]


# --------------------------------------------------------------------------- terrahash eval on it


def test_terrahash_eval_on_the_transfer_set(trained, recut, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(trained / "run"), "--data", str(recut), "--cache-dir",
                 str(trained / "cache"), "--device", "cpu", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    # The training classes, other images: a transfer figure by its fingerprint, leave-one-out.
    assert report["classes"] == report["trained_on"]["classes"] == ["agricultural", "airplane", "baseballdiamond"]
    assert report["transfer"] is True and "dataset differs" in report["transfer_reasons"][0]
    assert report["database"]["rule"] == "leave_one_out" and report["database"]["images"] == 6
    for kind in (report, report["asymmetric"], report["float"]):
        assert all(0.0 <= v <= 1.0 for v in kind["image_to_image"].values())
        assert kind["text_to_image"] is None
    assert "TRANSFER" in printed
