"""Tests for serving.ingest.dataset: the real UCM-Captions set and small fake datasets built in tmp_path."""

import json
import logging
import re
import shutil
from pathlib import Path

import pytest

from serving.ingest.dataset import (
    KNOWN_SPLITS,
    CaptionDataset,
    DatasetError,
    find_annotation_file,
    load_dataset,
)
from tests.conftest import UCM

# --------------------------------------------------------------------------- helpers


def require_ucm() -> Path:
    """The real UCM-Captions folder (tests/conftest.py's UCM: $TERRAHASH_DATA, else ../shared beside the repo)."""
    path = UCM
    if not (path / "dataset_ucm.json").is_file():
        pytest.skip(f"UCM-Captions dataset not found at {path} (expected dataset_ucm.json + images/; set TERRAHASH_DATA)")
    return path


def real_jpegs(n: int) -> list[Path]:
    """``n`` real JPEG files from the shared set (to copy into tmp_path)."""
    root = require_ucm()
    files = sorted((root / "images" / "agricultural").glob("*.jpg"))[:n]
    assert len(files) == n
    return files


def sentences(*raws):
    return [{"raw": r, "tokens": r.split()} for r in raws]


def entry(filename, split="train", cls="farm", filepath="images", caps=("a farm .", "green fields .")):
    e = {"filename": filename, "split": split, "sentences": sentences(*caps)}
    if filepath is not None:
        e["filepath"] = filepath
    if cls is not None:
        e["class"] = cls
    return e


def write_json(folder: Path, document, name="dataset_fake.json") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps(document, indent=1))
    return path


def make_images(folder: Path, names) -> list[Path]:
    """Copy real JPEGs into ``folder`` under the given names."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for src, name in zip(real_jpegs(len(names)), names):
        dst = folder / name
        shutil.copyfile(src, dst)
        out.append(dst)
    return out


@pytest.fixture
def fake(tmp_path):
    """A valid 3-image dataset: a.jpg (train), b.jpg (val), c.jpg (test) under images/."""
    make_images(tmp_path / "images", ["a.jpg", "b.jpg", "c.jpg"])
    doc = {
        "dataset": "fake",
        "images": [
            entry("a.jpg", "train", "farm"),
            entry("b.jpg", "val", "forest"),
            entry("c.jpg", "test", "farm"),
        ],
    }
    return tmp_path, doc


def load_doc(folder: Path, doc, **kw) -> CaptionDataset:
    write_json(folder, doc)
    return load_dataset(folder, **kw)


def expect_error(folder: Path, doc, *fragments, **kw) -> str:
    """Loading ``doc`` fails with a DatasetError naming the JSON file and every fragment."""
    json_path = write_json(folder, doc)
    with pytest.raises(DatasetError) as info:
        load_dataset(folder, **kw)
    message = str(info.value)
    assert str(json_path) in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


# --------------------------------------------------------------------------- real UCM set


@pytest.fixture(scope="module")
def ucm() -> CaptionDataset:
    return load_dataset(require_ucm(), check_images=True)


def test_ucm_counts_and_splits(ucm):
    assert ucm.name == "ucm_captions"  # the JSON's "dataset" field
    assert ucm.json_path == require_ucm() / "dataset_ucm.json"
    assert len(ucm.records) == 2100
    assert ucm.skipped == ()
    assert len(ucm.split("train")) == 1680
    assert len(ucm.split("val")) == 210
    assert len(ucm.split("test")) == 210
    assert len(ucm.split("train", "val", "test")) == 2100
    assert {r.split for r in ucm.records} == {"train", "val", "test"}
    # indexes are positions in the dataset
    assert [r.index for r in ucm.records] == list(range(2100))


def test_ucm_classes_and_captions(ucm):
    assert len(ucm.classes) == 21
    assert list(ucm.classes) == sorted(ucm.classes)
    assert "agricultural" in ucm.classes and "tenniscourt" in ucm.classes
    for cls in ucm.classes:
        assert sum(r.label == cls for r in ucm.records) == 100
    for r in ucm.records:
        assert len(r.captions) == 5
        assert all(c and c == c.strip() for c in r.captions)
    first = ucm.records[0]
    assert first.captions[0] == "There is a piece of farmland ."
    assert first.label == "agricultural"


def test_ucm_paths_exist(ucm):
    root = require_ucm()
    for r in ucm.records:
        assert r.path.is_file(), r.path
        assert r.path.suffix == ".jpg"
        # images/<class>/<file>
        assert r.path.parent.name == r.label
        assert r.path.parent.parent == root / "images"
    assert len({r.path for r in ucm.records}) == 2100


def test_ucm_other_splits(ucm):
    test = ucm.split("test")
    db = ucm.other_splits("test")
    assert len(db) == 1890
    assert {r.split for r in db} == {"train", "val"}
    assert {r.index for r in db}.isdisjoint({r.index for r in test})
    assert {r.index for r in db} | {r.index for r in test} == set(range(2100))
    # dataset order is kept
    assert [r.index for r in db] == sorted(r.index for r in db)
    assert len(ucm.other_splits("val")) == 1890
    assert len(ucm.other_splits("train")) == 420


def test_ucm_label_ids(ucm):
    recs = ucm.split("test")
    ids = ucm.label_ids(recs)
    assert len(ids) == len(recs)
    assert all(0 <= i < 21 for i in ids)
    for r, i in zip(recs, ids):
        assert ucm.classes[i] == r.label
    assert sorted(set(ucm.label_ids(list(ucm.records)))) == list(range(21))
    assert ucm.label_ids([]) == []


def test_ucm_fingerprint(ucm):
    fp = ucm.fingerprint()
    assert re.fullmatch(r"[0-9a-f]{16}", fp)
    assert fp == ucm.fingerprint()
    # the same data loaded again (from the JSON path this time) has the same fingerprint
    again = load_dataset(require_ucm() / "dataset_ucm.json", check_images=False)
    assert again.fingerprint() == fp
    assert len(again.records) == 2100


def test_fingerprint_changes_with_content(fake):
    folder, doc = fake
    fp1 = load_doc(folder, doc).fingerprint()
    doc["images"][0]["sentences"][0]["raw"] = "a different caption ."
    fp2 = load_doc(folder, doc).fingerprint()
    assert fp1 != fp2


# --------------------------------------------------------------------------- valid fake set


def test_fake_dataset_loads(fake):
    folder, doc = fake
    ds = load_doc(folder, doc)
    assert ds.name == "fake"
    assert [r.path.name for r in ds.records] == ["a.jpg", "b.jpg", "c.jpg"]
    assert [r.split for r in ds.records] == ["train", "val", "test"]
    assert ds.classes == ("farm", "forest")
    assert ds.label_ids(list(ds.records)) == [0, 1, 0]
    assert ds.records[0].captions == ("a farm .", "green fields .")
    assert ds.records[0].path == folder / "images" / "a.jpg"


def test_captions_are_stripped_and_unicode_kept(fake):
    folder, doc = fake
    doc["images"][0]["sentences"] = sentences("  a café by the river \n", "zone résidentielle")
    ds = load_doc(folder, doc)
    assert ds.records[0].captions == ("a café by the river", "zone résidentielle")


def test_name_defaults_to_folder(fake):
    folder, doc = fake
    del doc["dataset"]
    assert load_doc(folder, doc).name == folder.name


def test_restval_counts_as_train(fake):
    folder, doc = fake
    doc["images"][1]["split"] = "restval"
    ds = load_doc(folder, doc)
    assert [r.path.name for r in ds.split("train")] == ["a.jpg", "b.jpg"]
    assert [r.path.name for r in ds.split("restval")] == ["b.jpg"]
    assert ds.split("val") == []
    # the database for train queries leaves restval out too
    assert [r.path.name for r in ds.other_splits("train")] == ["c.jpg"]
    assert [r.path.name for r in ds.other_splits("test")] == ["a.jpg", "b.jpg"]


def test_unknown_split_name_in_split_call(fake):
    folder, doc = fake
    ds = load_doc(folder, doc)
    with pytest.raises(DatasetError, match="validation"):
        ds.split("validation")
    with pytest.raises(DatasetError, match="tset"):
        ds.split("train", "tset")
    with pytest.raises(DatasetError, match="Test"):
        ds.other_splits("Test")
    assert "restval" in KNOWN_SPLITS


def test_check_images_false_does_not_open_files(fake):
    folder, doc = fake
    doc["images"].append(entry("missing.jpg", "train"))
    ds = load_doc(folder, doc, check_images=False)
    assert len(ds.records) == 4
    assert not ds.records[3].path.exists()


# --------------------------------------------------------------------------- malformed JSON


def test_malformed_json_names_file_and_line(tmp_path):
    path = tmp_path / "dataset_bad.json"
    path.write_text('{\n  "images": [\n    {"filename": "a.jpg",,}\n  ]\n}\n')
    with pytest.raises(DatasetError) as info:
        load_dataset(tmp_path)
    message = str(info.value)
    assert str(path) in message
    assert "malformed JSON" in message
    assert "line 3" in message


def test_json_not_utf8(tmp_path):
    path = tmp_path / "dataset_bad.json"
    path.write_bytes(b'{"images": ["\xff\xfe"]}')
    with pytest.raises(DatasetError, match=re.escape(str(path))):
        load_dataset(tmp_path)


@pytest.mark.parametrize(
    "document",
    [[], [{"filename": "a.jpg"}], "images", 3, {}, {"images": {"a.jpg": {}}}, {"images": None}, {"Images": []}],
    ids=["empty-list", "list", "string", "number", "empty-object", "images-dict", "images-null", "wrong-key"],
)
def test_top_level_layout(tmp_path, document):
    expect_error(tmp_path, document, "'images' list")


def test_entry_not_an_object(fake):
    folder, doc = fake
    doc["images"].insert(1, "b.jpg")
    expect_error(folder, doc, "images[1]", "expected an object", "str")


def test_missing_filename(fake):
    folder, doc = fake
    del doc["images"][2]["filename"]
    expect_error(folder, doc, "images[2]", "missing key 'filename'")


def test_missing_sentences_is_an_image_only_entry(fake):
    # Image-only labelled sets are read for evaluation (tests/evaluation/test_transfer.py).
    folder, doc = fake
    del doc["images"][2]["sentences"]
    doc["images"][1]["sentences"] = []
    ds = load_doc(folder, doc)
    assert [r.captions for r in ds.records][1:] == [(), ()]
    with pytest.raises(DatasetError, match="training needs captions.*b.jpg"):
        ds.require_captions(("train", "val"), "training")
    ds.require_captions(("train",), "training")  # a.jpg has its captions


def test_split_missing_for_one_image_only(fake):
    folder, doc = fake
    del doc["images"][2]["split"]
    expect_error(folder, doc, "1 images have no 'split' while others do")


def test_unknown_split_in_file(fake):
    folder, doc = fake
    doc["images"][1]["split"] = "validation"
    expect_error(folder, doc, "images[1]", "b.jpg", "'validation'", "unknown split")


@pytest.mark.parametrize(
    "bad_sentences",
    [
        [{"tokens": ["a", "farm"]}],
        [{"raw": "ok"}, {"text": "no raw here"}],
        [{"raw": None}],
        [{"raw": 5}],
        ["a bare string"],
        None,
        "a farm",
    ],
    ids=["no-raw", "second-no-raw", "raw-null", "raw-int", "bare-string", "null", "string"],
)
def test_sentence_without_raw(fake, bad_sentences):
    folder, doc = fake
    doc["images"][0]["sentences"] = bad_sentences
    expect_error(folder, doc, "images[0]", "a.jpg", "'raw'")


@pytest.mark.parametrize("caps", [[""], ["fine", "   "], ["\n"]], ids=["empty", "blank", "newline"])
def test_empty_caption(fake, caps):
    folder, doc = fake
    doc["images"][2]["sentences"] = sentences(*caps)
    expect_error(folder, doc, "images[2]", "c.jpg", "empty caption")


# --------------------------------------------------------------------------- bad images


def test_missing_image_names_it_and_counts(fake):
    folder, doc = fake
    (folder / "images" / "b.jpg").unlink()
    message = expect_error(folder, doc, str(folder / "images" / "b.jpg"), "missing", "1 image(s)")
    assert "a.jpg" not in message and "c.jpg" not in message


def test_all_bad_images_listed_up_to_five(fake):
    folder, doc = fake
    doc["images"] += [entry(f"gone{i}.jpg") for i in range(7)]
    message = expect_error(folder, doc, "7 image(s)", "gone0.jpg", "gone4.jpg", "...")
    assert "gone5.jpg" not in message


def test_truncated_jpeg(fake):
    folder, doc = fake
    path = folder / "images" / "b.jpg"
    path.write_bytes(path.read_bytes()[:200])
    expect_error(folder, doc, str(path), "unreadable", "1 image(s)")


def test_jpeg_truncated_mid_scan_is_rejected(fake):
    folder, doc = fake
    path = folder / "images" / "b.jpg"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    expect_error(folder, doc, str(path), "unreadable")


def test_text_file_named_jpg(fake):
    folder, doc = fake
    path = folder / "images" / "c.jpg"
    path.write_text("this is not an image\n")
    expect_error(folder, doc, str(path), "unreadable", "1 image(s)")


def test_empty_file_named_jpg(fake):
    folder, doc = fake
    path = folder / "images" / "a.jpg"
    path.write_bytes(b"")
    expect_error(folder, doc, str(path), "unreadable")


def test_directory_named_jpg_is_missing(fake):
    folder, doc = fake
    path = folder / "images" / "a.jpg"
    path.unlink()
    path.mkdir()
    expect_error(folder, doc, str(path), "missing")


def test_skip_bad_images(fake, caplog):
    folder, doc = fake
    truncated = folder / "images" / "a.jpg"
    truncated.write_bytes(truncated.read_bytes()[:200])
    text = folder / "images" / "c.jpg"
    text.write_text("not a jpeg")
    doc["images"].append(entry("gone.jpg", "test"))
    with caplog.at_level(logging.WARNING, logger="serving.ingest.dataset"):
        ds = load_doc(folder, doc, skip_bad_images=True)
    assert [r.path.name for r in ds.records] == ["b.jpg"]
    assert ds.records[0].index == 0  # indexes stay contiguous after skipping
    skipped = dict(ds.skipped)
    assert set(skipped) == {str(truncated), str(text), str(folder / "images" / "gone.jpg")}
    assert skipped[str(folder / "images" / "gone.jpg")] == "missing"
    assert skipped[str(truncated)].startswith("unreadable")
    assert skipped[str(text)].startswith("unreadable")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "serving.ingest.dataset"]
    assert len(warnings) == 1
    assert "skipped 3 bad image(s)" in warnings[0].getMessage()
    assert str(ds.json_path) in warnings[0].getMessage()


def test_no_warning_when_nothing_skipped(fake, caplog):
    folder, doc = fake
    with caplog.at_level(logging.WARNING, logger="serving.ingest.dataset"):
        ds = load_doc(folder, doc, skip_bad_images=True)
    assert ds.skipped == ()
    assert len(ds.records) == 3
    assert not [r for r in caplog.records if r.name == "serving.ingest.dataset"]


# --------------------------------------------------------------------------- classes


def test_mixed_labelled_and_unlabelled(fake):
    folder, doc = fake
    del doc["images"][1]["class"]
    expect_error(folder, doc, "1 images have no 'class'")


def test_no_class_field(fake):
    folder, doc = fake
    for e in doc["images"]:
        del e["class"]
    ds = load_doc(folder, doc)
    assert ds.classes == ()
    assert all(r.label is None for r in ds.records)
    with pytest.raises(DatasetError, match="class"):
        ds.label_ids(list(ds.records))
    with pytest.raises(DatasetError, match=re.escape(str(ds.json_path))):
        ds.label_ids([])


# --------------------------------------------------------------------------- RSICD layout


@pytest.mark.parametrize("folder_name", ["", "images", "RSICD_images"])
def test_rsicd_images_without_filepath(tmp_path, folder_name):
    make_images(tmp_path / folder_name, ["x.jpg", "y.jpg"])
    doc = {"images": [entry("x.jpg", filepath=None, cls=None), entry("y.jpg", "test", filepath=None, cls=None)]}
    ds = load_doc(tmp_path, doc)
    assert [r.path for r in ds.records] == [tmp_path / folder_name / "x.jpg", tmp_path / folder_name / "y.jpg"]
    assert ds.classes == ()


def test_rsicd_missing_image_reported_next_to_json(tmp_path):
    make_images(tmp_path / "images", ["x.jpg"])
    doc = {"images": [entry("x.jpg", filepath=None), entry("nowhere.jpg", filepath=None)]}
    expect_error(tmp_path, doc, str(tmp_path / "nowhere.jpg"), "missing")


# --------------------------------------------------------------------------- find_annotation_file


def test_find_annotation_file(tmp_path):
    path = write_json(tmp_path, {"images": []}, name="dataset_rsicd.json")
    (tmp_path / "other.json").write_text("{}")  # not dataset*.json: ignored
    assert find_annotation_file(tmp_path) == path
    assert find_annotation_file(path) == path  # a file is taken as is
    assert load_dataset(path).records == ()


def test_find_annotation_file_none(tmp_path):
    (tmp_path / "captions.json").write_text("{}")
    with pytest.raises(DatasetError, match=r"exactly one.*none") as info:
        find_annotation_file(tmp_path)
    assert str(tmp_path) in str(info.value)
    with pytest.raises(DatasetError):
        load_dataset(tmp_path)


def test_find_annotation_file_two(tmp_path):
    write_json(tmp_path, {"images": []}, name="dataset_a.json")
    write_json(tmp_path, {"images": []}, name="dataset_b.json")
    with pytest.raises(DatasetError) as info:
        find_annotation_file(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message
    assert "dataset_a.json" in message and "dataset_b.json" in message


def test_find_annotation_file_no_folder(tmp_path):
    with pytest.raises(DatasetError, match="no such dataset folder"):
        find_annotation_file(tmp_path / "absent")
