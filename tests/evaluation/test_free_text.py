"""Free-text queries: the shipped UCM set, the loader's errors, and their figures."""
from __future__ import annotations

import json

import numpy as np
import pytest

from cluster.cli.main import main
from evaluation.evaluate import evaluate_model
from evaluation.free_text import DEFAULT_QUERIES, QueryFileError, caption_overlap, free_text_figures, load_queries

README_EXAMPLE = "many planes parked next to a long building"


def test_the_shipped_set_loads_with_five_queries_per_class():
    queries = load_queries(DEFAULT_QUERIES)
    by_class = queries.by_class()
    assert len(by_class) == 21 and all(len(texts) == 5 for texts in by_class.values())
    assert README_EXAMPLE in by_class["airplane"]


def test_every_ucm_class_has_queries_and_none_is_a_caption(ucm_dir):
    queries = load_queries(DEFAULT_QUERIES)
    document = json.loads((ucm_dir / "dataset_ucm.json").read_text())
    assert set(queries.classes) == {e["class"] for e in document["images"]}
    captions = [s["raw"] for e in document["images"] for s in e["sentences"]]
    report = caption_overlap(queries.texts(), captions)
    assert not [r["query"] for r in report if r["in_a_caption"]]
    # Worded unlike the captions: no query shares more than a fifth of its word trigrams with one.
    assert max(r["overlap"] for r in report) <= 0.2


def test_caption_overlap_finds_a_query_inside_a_caption():
    report = caption_overlap(["planes parked at the airport", "jets on the apron"],
                             ["Many planes parked at the airport .", "A road ."])
    assert report[0]["in_a_caption"] and report[0]["overlap"] == 1.0
    assert not report[1]["in_a_caption"] and report[1]["overlap"] == 0.0


def write(tmp_path, document) -> str:
    path = tmp_path / "queries.json"
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    return str(path)


@pytest.mark.parametrize("document, message", [
    ({"classes": ["airplane"], "queries": [{"text": "jets", "class": "airplanes"}]}, "unknown class 'airplanes'"),
    ({"classes": ["airplane"], "queries": [{"text": "   ", "class": "airplane"}]}, "empty query"),
    ({"classes": ["airplane"], "queries": [{"class": "airplane"}]}, "'text' string"),
    ({"queries": [{"text": "jets", "class": "airplane"}]}, "'classes' list"),
    ({"classes": ["airplane"], "queries": []}, "no queries"),
    ({"classes": ["airplane"], "queries": [{"text": "Jets", "class": "airplane"},
                                           {"text": "jets ", "class": "airplane"}]}, "twice"),
    ("{not json", "not a JSON query file"),
    ([1, 2], "'queries' list"),
], ids=["unknown-class", "empty", "no-text", "no-classes", "no-queries", "duplicate", "not-json", "not-object"])
def test_a_bad_query_file_is_a_clear_error_naming_it(tmp_path, document, message):
    path = write(tmp_path, document)
    with pytest.raises(QueryFileError, match=message) as info:
        load_queries(path)
    assert path in str(info.value)


def test_a_missing_query_file_is_a_clear_error(tmp_path):
    with pytest.raises(QueryFileError, match="no such query file.*ucm_free_text"):
        load_queries(tmp_path / "nowhere.json")


def test_a_shipped_set_can_be_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # wherever the command runs
    assert load_queries("ucm_free_text").path == DEFAULT_QUERIES
    assert load_queries("ucm_free_text.json").queries == load_queries(DEFAULT_QUERIES).queries
    with pytest.raises(QueryFileError):
        load_queries("sub/ucm_free_text")  # a path is only a path


def test_free_text_figures_on_synthetic_codes():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 32))
    db_labels = np.repeat(np.arange(3), 10)
    db = centres[db_labels] + rng.normal(scale=0.3, size=(30, 32))
    query_labels = np.repeat(np.arange(3), 4)
    perfect = free_text_figures(centres[query_labels], query_labels, db, db_labels, ["a", "b", "c"])
    noisy = free_text_figures(rng.normal(size=(12, 32)), query_labels, db, db_labels, ["a", "b", "c"])
    for figures in (perfect, noisy):
        for kind in ("binary", "asymmetric", "float"):
            f = figures[kind]
            assert all(0.0 <= f[name] <= 1.0 for name in ("map_all", "map_50", "p_at_10"))
            assert set(f["per_class"]) == {"a", "b", "c"}
            # The same number of queries per class: the class means average to the overall mean.
            assert np.mean(list(f["per_class"].values())) == pytest.approx(f["map_all"])
    assert perfect["float"]["map_all"] == pytest.approx(1.0) and perfect["binary"]["p_at_10"] == pytest.approx(1.0)
    assert noisy["float"]["map_all"] < 0.9


def test_eval_with_queries_on_a_tiny_model(trained, trained_other, subset):
    kwargs = dict(cache_dir=trained / "cache", device="cpu", queries=DEFAULT_QUERIES)
    report = evaluate_model(trained / "run", subset, "test", **kwargs)
    free = report["free_text"]
    classes = report["classes"]  # the subset's 3 classes: the other 18 classes' queries are left out
    assert free["queries"] == 15 and len(free["classes_left_out"]) == 18 and free["classes_without_queries"] == []
    for kind in ("binary", "asymmetric", "float"):
        assert all(0.0 <= free[kind][name] <= 1.0 for name in ("map_all", "map_50", "p_at_10"))
        assert set(free[kind]["per_class"]) == set(classes)
    other = evaluate_model(trained_other / "run", subset, "test", **{**kwargs, "cache_dir": trained_other / "cache"})
    assert other["free_text"]["float"]["map_all"] != free["float"]["map_all"]
    # Evaluated again, the same model gives the same figures: the change is the model's.
    again = evaluate_model(trained / "run", subset, "test", **kwargs)["free_text"]
    assert again == free


def test_cli_eval_prints_the_free_text_figures_beside_the_captions(trained, subset, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(trained / "run"), "--data", str(subset), "--cache-dir",
                 str(trained / "cache"), "--queries", "ucm_free_text", "--json", str(out)]) == 0  # as docs/results.md
    printed = capsys.readouterr().out
    for line in ("free_text.map_all", "captions t2i.map_all", "worst first", "R@K ceiling", "asymmetric"):
        assert line in printed, line
    report = json.loads(out.read_text())
    worst = min(report["free_text"]["binary"]["per_class"].items(), key=lambda item: (item[1], item[0]))[0]
    listing = printed[printed.index("worst first"):].splitlines()
    assert listing[1].split()[0] == worst  # the worst class comes first

    assert main(["eval", "--model", str(trained / "run"), "--data", str(subset),
                 "--queries", str(write(tmp_path, {"classes": ["x"], "queries": [{"text": "", "class": "x"}]}))]) == 2
    assert "empty query" in capsys.readouterr().err
