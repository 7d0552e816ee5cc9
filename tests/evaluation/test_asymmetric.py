"""Asymmetric ranking (continuous query code . binary database code) against plain-loop references,
and leave-one-out exclusion, on small synthetic codes."""
from __future__ import annotations

import numpy as np
import pytest

from evaluation import metrics
from evaluation.retrieval import SplitCodes, evaluate_rows, retrieval_figures, scores
from tests.evaluation.test_metrics import ref_ap


def ref_asymmetric_order(query, db):
    """Sort database ids by (-sum_b q_b * sign(d_b), id), with Python loops."""
    order = []
    for q in query:
        score = [sum(float(qb) * (1.0 if db_b >= 0 else -1.0) for qb, db_b in zip(q, d)) for d in db]
        order.append(sorted(range(len(db)), key=lambda j: (-score[j], j)))
    return order


def ref_map(orders, relevant):
    """mAP over the whole ranking, walking each ranked list."""
    aps = []
    for q, order in enumerate(orders):
        hits, total = 0, 0.0
        for i, j in enumerate(order, start=1):
            if relevant[q][j]:
                hits += 1
                total += hits / i
        aps.append(total / hits if hits else 0.0)
    return float(np.mean(aps))


def signs(x):
    return np.where(x >= 0, 1, -1).astype(np.int8)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_asymmetric_ranking_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    query = rng.normal(size=(7, 12))
    db = signs(rng.normal(size=(30, 12)))
    db[5] = db[3]  # exact ties: broken by the lower id
    score, descending = scores(query, db, "asymmetric")
    assert descending
    assert metrics.rank(score, descending=True).tolist() == ref_asymmetric_order(query, db)


@pytest.mark.parametrize("seed", [0, 1])
def test_asymmetric_figures_equal_brute_force_map(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, size=40)
    # Codes that carry their class a little, so the figures are not all alike.
    centres = rng.normal(size=(3, 16))
    images = centres[labels] + rng.normal(scale=1.5, size=(40, 16))
    captions = images.repeat(2, axis=0) + rng.normal(scale=0.5, size=(80, 16))
    captions_of = [np.array([2 * i, 2 * i + 1]) for i in range(40)]
    query_rows, db_rows = np.arange(30, 40), np.arange(30)
    figures = evaluate_rows(images, captions, labels, captions_of, query_rows, db_rows, asymmetric=True)
    asym = figures["asymmetric"]

    relevant_i2i = labels[query_rows][:, None] == labels[db_rows][None, :]
    expected = ref_map(ref_asymmetric_order(images[query_rows], signs(images[db_rows])), relevant_i2i)
    assert asym["image_to_image"]["map_all"] == pytest.approx(expected, abs=1e-12)

    query_captions = np.concatenate([captions_of[r] for r in query_rows])
    relevant_t2i = labels[query_rows].repeat(2)[:, None] == labels[db_rows][None, :]
    expected = ref_map(ref_asymmetric_order(captions[query_captions], signs(images[db_rows])), relevant_t2i)
    assert asym["text_to_image"]["map_all"] == pytest.approx(expected, abs=1e-12)
    # Same structure as the binary figures.
    assert {k: set(v) if isinstance(v, dict) else v is not None for k, v in asym.items()} == \
        {k: set(v) if isinstance(v, dict) else v is not None for k, v in figures["binary"].items()}


def test_asymmetric_differs_from_hamming_where_the_query_is_sure_of_one_bit():
    # Query signs (+, +, +). A agrees on the bit the query is sure of (3.0), B on the two weak bits:
    # Hamming puts B (1 bit off) before A (2 off); the inner product puts A (2.8) before B (-2.8).
    query = np.array([[3.0, 0.1, 0.1]])
    db = np.array([[1, -1, -1], [-1, 1, 1]], dtype=np.int8)
    hamming, _ = scores(signs(query), db, "hamming")
    asym, _ = scores(query, db, "asymmetric")
    assert metrics.rank(hamming).tolist() == [[1, 0]]
    assert metrics.rank(asym, descending=True).tolist() == [[0, 1]]

    q = SplitCodes(query, np.array([0]), np.zeros((0, 3)), np.zeros(0, dtype=np.int64))
    d = SplitCodes(db, np.array([0, 1]), np.zeros((0, 3)), np.zeros(0, dtype=np.int64))
    binary = retrieval_figures(SplitCodes(signs(query), q.image_labels, q.captions, q.caption_owner), d, "hamming")
    asymmetric = retrieval_figures(q, d, "asymmetric")
    assert binary["image_to_image"]["map_all"] == pytest.approx(0.5)  # the relevant A is second
    assert asymmetric["image_to_image"]["map_all"] == pytest.approx(1.0)  # and first here
    assert binary["text_to_image"] is None and binary["mr"] is None  # no captions: no text figures


def test_asymmetric_scores_reject_bad_codes():
    with pytest.raises(ValueError, match="code lengths differ"):
        metrics.asymmetric_scores(np.zeros((1, 4)), np.ones((2, 8)))
    with pytest.raises(ValueError, match="NaN"):
        metrics.asymmetric_scores(np.full((1, 4), np.nan), np.ones((2, 4)))
    with pytest.raises(ValueError, match="only -1/\\+1"):
        metrics.asymmetric_scores(np.zeros((1, 4)), np.full((2, 4), 0.5))


def ref_loo_map(codes, labels):
    """Leave-one-out i2i mAP by Hamming: each image against all the others, by plain loops."""
    aps = []
    for q in range(len(codes)):
        others = [j for j in range(len(codes)) if j != q]
        dist = {j: int(np.sum(codes[q] != codes[j])) for j in others}
        order = sorted(others, key=lambda j: (dist[j], j))
        aps.append(ref_ap(labels[j] == labels[q] for j in order))
    return float(np.mean(aps))


def test_leave_one_out_never_ranks_a_query_against_itself():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, size=12)
    images = rng.normal(size=(12, 8))
    captions_of = [np.zeros(0, dtype=np.int64)] * 12  # image-only
    rows = np.arange(12)
    figures = evaluate_rows(images, np.zeros((0, 8)), labels, captions_of, rows, rows)
    assert figures["binary"]["image_to_image"]["map_all"] == pytest.approx(ref_loo_map(signs(images), labels))
    # Without the exclusion, every query would find itself first at distance 0.
    score, _ = scores(signs(images), signs(images), "hamming")
    with_self = metrics.mean_average_precision(score, labels[:, None] == labels[None, :])
    assert with_self > figures["binary"]["image_to_image"]["map_all"]
    assert figures["binary"]["text_to_image"] is None and figures["float"]["image_to_text"] is None


def test_precision_at_k_counts_only_what_a_query_may_retrieve():
    distances = np.array([[0, 1, 2]])
    relevance = np.array([[True, True, False]])
    exclude = np.array([[True, False, False]])
    # Item 0 left out: the top 2 of what remains are items 1 (relevant) and 2 (not).
    assert metrics.precision_at_k(distances, relevance, k=2, exclude=exclude) == pytest.approx(0.5)
    # k above what remains is clipped to it, as k above N is.
    assert metrics.precision_at_k(distances, relevance, k=10, exclude=exclude) == pytest.approx(0.5)
    assert metrics.mean_average_precision(distances, relevance, exclude=exclude) == pytest.approx(1.0)
