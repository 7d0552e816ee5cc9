"""The text-to-image R@K ceiling that duplicate captions impose."""
from __future__ import annotations

import json

import numpy as np
import pytest

from evaluation.ceiling import best_ranks, footnote, recall_ceiling


def test_best_ranks_on_a_hand_made_split():
    # Three images. "a field" is a caption of images 0, 1 (twice) and 2: one ranking serves all four,
    # at best image 1 first (two of its captions hit at rank 1), then 0, then 2 (lower id first).
    captions = ["a field", "a field", "a field ", "a field", "a road", "two  planes"]
    owners = [0, 1, 1, 2, 0, 2]
    assert best_ranks(captions, owners).tolist() == [2, 1, 1, 3, 1, 1]
    ceiling = recall_ceiling(captions, owners, ks=(1, 2, 3))
    assert ceiling["r1"] == pytest.approx(100 * 4 / 6)
    assert ceiling["r2"] == pytest.approx(100 * 5 / 6)
    assert ceiling["r3"] == 100.0
    assert (ceiling["captions"], ceiling["distinct_captions"]) == (6, 3)


def test_distinct_captions_put_no_ceiling():
    ceiling = recall_ceiling(["one", "two", "three"], [0, 1, 2])
    assert ceiling["r1"] == ceiling["r5"] == 100.0


def test_no_captions_no_ceiling():
    assert recall_ceiling([], []) is None
    assert footnote(None, "test") is None
    with pytest.raises(ValueError, match="owners"):
        best_ranks(["a"], [0, 1])


def test_the_ceiling_holds_for_any_ranking():
    """No ranking of the images (the same one for identical texts) beats the bound: brute force."""
    from itertools import permutations, product

    captions = ["x", "x", "y", "x", "y", "z"]
    owners = [0, 1, 1, 2, 2, 2]
    bound = recall_ceiling(captions, owners, ks=(1, 2))
    texts = sorted(set(captions))
    best = {1: 0.0, 2: 0.0}
    for rankings in product(list(permutations(range(3))), repeat=len(texts)):
        order = dict(zip(texts, rankings))
        for k in best:
            hits = np.mean([owners[m] in order[c][:k] for m, c in enumerate(captions)])
            best[k] = max(best[k], 100 * hits)
    assert bound["r1"] == pytest.approx(best[1]) and bound["r2"] == pytest.approx(best[2])


def test_ucm_test_split_ceiling_is_the_one_the_readme_states(ucm_dir):
    document = json.loads((ucm_dir / "dataset_ucm.json").read_text())
    test = [e for e in document["images"] if e["split"] == "test"]
    captions = [s["raw"] for e in test for s in e["sentences"]]
    owners = [i for i, e in enumerate(test) for _ in e["sentences"]]
    ceiling = recall_ceiling(captions, owners)
    assert ceiling["r1"] == pytest.approx(38, abs=0.5)  # "38.3%" in docs/results.md and `terrahash eval --help`
    assert ceiling["r5"] == pytest.approx(85, abs=0.5)  # "about 85%"
    assert "R@1 38.3" in footnote(ceiling, "test")
