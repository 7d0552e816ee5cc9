"""``python -m evaluation.held_out``: a captioned dataset split by class into a set to train on and an
image-only set of classes never trained on, and ``terrahash eval`` on the latter as a transfer figure."""
from __future__ import annotations

import json

import pytest

from cluster.cli.main import main as cli
from evaluation.held_out import HeldOutError, choose_classes, main
from tests.conftest import write_subset
from serving.ingest.dataset import load_dataset

CLASSES = ["agricultural", "airplane", "baseballdiamond", "beach", "buildings"]


@pytest.fixture(scope="module")
def five(ucm_dir, tmp_path_factory):
    """5 real UCM classes x (4 train, 2 val, 2 test), referenced in place."""
    return write_subset(ucm_dir, tmp_path_factory.mktemp("five"), classes=5)


def test_seen_and_unseen_sets_split_the_dataset_by_class(five, tmp_path, capsys):
    out = tmp_path / "held"
    assert main(["--data", str(five), "--out", str(out), "--classes", "beach,buildings"]) == 0
    assert "held out beach, buildings: 16 images" in capsys.readouterr().out
    source = load_dataset(five)
    seen, unseen = load_dataset(out / "seen"), load_dataset(out / "unseen")
    assert seen.classes == ("agricultural", "airplane", "baseballdiamond")
    assert unseen.classes == ("beach", "buildings")
    by_path = {r.path.resolve(): r for r in source.records}
    for record in seen.records:  # the same files, captions and splits as the source
        original = by_path[record.path.resolve()]
        assert (record.captions, record.split, record.label) == (original.captions, original.split, original.label)
    assert all(r.captions == () and r.split is None for r in unseen.records)  # image-only, split-less
    assert {r.path.resolve() for r in seen.records} | {r.path.resolve() for r in unseen.records} == set(by_path)
    record = json.loads((out / "held_out.json").read_text())
    assert record["held_out"] == ["beach", "buildings"] and record["images"] == {"seen": 24, "unseen": 16}


def test_drawn_classes_depend_on_the_seed_only():
    assert choose_classes(CLASSES, 2, seed=3) == choose_classes(list(reversed(CLASSES)), 2, seed=3)
    assert len({tuple(choose_classes(CLASSES, 2, seed=s)) for s in range(10)}) > 1
    with pytest.raises(HeldOutError, match="unknown classes"):
        choose_classes(CLASSES, names=["beach", "woods"])
    with pytest.raises(HeldOutError, match="at least one on each side"):
        choose_classes(CLASSES, count=5)


def test_bad_options_fail_clearly_and_write_nothing(five, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    assert main(["--data", str(five), "--out", str(taken), "--count", "2"]) == 2
    assert "not empty" in capsys.readouterr().err and sorted(p.name for p in taken.iterdir()) == ["keep.txt"]
    assert main(["--data", str(five), "--out", str(tmp_path / "new")]) == 2
    assert "--count" in capsys.readouterr().err and not (tmp_path / "new").exists()


def test_a_model_is_evaluated_on_classes_it_never_saw_as_a_transfer_figure(trained, five, tmp_path):
    """The tiny model was trained on agricultural, airplane and baseballdiamond only."""
    out = tmp_path / "held"
    assert main(["--data", str(five), "--out", str(out), "--classes", "beach,buildings"]) == 0
    report_path = tmp_path / "eval.json"
    assert cli(["eval", "--model", str(trained / "run"), "--data", str(out / "unseen"), "--cache-dir",
                str(trained / "cache"), "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["transfer"] is True and report["classes"] == ["beach", "buildings"]
    assert report["database"]["rule"] == "leave_one_out" and report["database"]["images"] == 16
    assert 0.0 <= report["image_to_image"]["map_all"] <= 1.0 and report["text_to_image"] is None
