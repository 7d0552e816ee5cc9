"""Tests for evaluation.metrics against plain loop-based reference implementations."""

import numpy as np
import pytest

from evaluation.metrics import (
    average_precision,
    hamming_distances,
    mean_average_precision,
    mean_recall,
    pack_bits,
    precision_at_k,
    precision_recall_curve,
    rank,
    recall_at_k,
    relevance_from_labels,
    to_bits,
)

# --- obviously-correct references, written with Python loops ---------------------


def ref_bit(value):
    """One code value as 0/1."""
    return 1 if value == 1 else 0


def ref_hamming(queries, db):
    """Count unequal bits pair by pair."""
    out = np.zeros((len(queries), len(db)), dtype=np.int64)
    for i, q in enumerate(queries):
        for j, d in enumerate(db):
            out[i, j] = sum(ref_bit(a) != ref_bit(b) for a, b in zip(q, d))
    return out


def ref_rank_row(row, ids, descending=False):
    """Indices sorted by (distance, id), or by (-score, id)."""
    sign = -1 if descending else 1
    return sorted(range(len(row)), key=lambda j: (sign * row[j], ids[j]))


def ref_ap(ranked_rel, k=None):
    """Walk the ranked list: sum of precision at each hit / number of hits in top k."""
    cut = list(ranked_rel) if k is None else list(ranked_rel)[:k]
    hits, total = 0, 0.0
    for i, rel in enumerate(cut, start=1):
        if rel:
            hits += 1
            total += hits / i
    return total / hits if hits else 0.0


def ref_ranked(distances, relevance, ids, descending):
    """Relevance lists in reference ranked order, one per query."""
    return [
        [relevance[q][j] for j in ref_rank_row(distances[q], ids, descending)]
        for q in range(len(distances))
    ]


def ref_map(distances, relevance, k, ids, descending):
    ranked = ref_ranked(distances, relevance, ids, descending)
    return sum(ref_ap(r, k) for r in ranked) / len(ranked)


def ref_precision_at_k(distances, relevance, k, ids, descending):
    ranked = ref_ranked(distances, relevance, ids, descending)
    return sum(sum(r[:k]) / k for r in ranked) / len(ranked)


def ref_recall_at_k(distances, gt, k, ids, descending):
    ranked = ref_ranked(distances, gt, ids, descending)
    return 100.0 * sum(any(r[:k]) for r in ranked) / len(ranked)


def ref_pr_curve(queries, db, relevance):
    bits = len(queries[0])
    dist = ref_hamming(queries, db)
    precision, recall = [], []
    for r in range(bits + 1):
        precisions, recalls = [], []
        for q in range(len(queries)):
            retrieved = [j for j in range(len(db)) if dist[q][j] <= r]
            rel_retrieved = sum(1 for j in retrieved if relevance[q][j])
            n_rel = sum(1 for j in range(len(db)) if relevance[q][j])
            if retrieved:
                precisions.append(rel_retrieved / len(retrieved))
            if n_rel:
                recalls.append(rel_retrieved / n_rel)
        precision.append(sum(precisions) / len(precisions) if precisions else 0.0)
        recall.append(sum(recalls) / len(recalls) if recalls else 0.0)
    return precision, recall


def random_codes(rng, n, bits, signed):
    bits01 = rng.integers(0, 2, size=(n, bits))
    return (2 * bits01 - 1).astype(np.float32) if signed else bits01


# --- to_bits / pack_bits ----------------------------------------------------------


def test_to_bits_maps_all_accepted_forms():
    expected = np.array([[1, 0, 1, 0]], dtype=np.uint8)
    for codes in (
        [[1.0, -1.0, 1.0, -1.0]],
        [[1, -1, 1, -1]],
        [[1, 0, 1, 0]],
        [[True, False, True, False]],
    ):
        out = to_bits(np.array(codes))
        assert out.dtype == np.uint8
        np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("bad", [[[0.5, 1.0]], [[2, 0]], [[np.nan, 1.0]]])
def test_to_bits_rejects_non_binary_values(bad):
    with pytest.raises(ValueError, match="codes must contain only"):
        to_bits(np.array(bad))


def test_to_bits_rejects_1d():
    with pytest.raises(ValueError, match="2-D"):
        to_bits(np.array([1, 0, 1]))


def test_pack_bits_is_big_endian_within_bytes():
    # 9 bits: bit 0 is the MSB of byte 0 (128); bit 8 is the MSB of byte 1 (128),
    # the 7 padding bits of byte 1 are zero. Bit 7 alone is the LSB of byte 0 (1).
    codes = np.array([[1, 0, 0, 0, 0, 0, 0, 0, 1], [-1, -1, -1, -1, -1, -1, -1, 1, -1]])
    packed = pack_bits(codes)
    assert packed.dtype == np.uint8
    np.testing.assert_array_equal(packed, [[128, 128], [1, 0]])


# --- hamming_distances --------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("bits", [1, 8, 13, 64])
@pytest.mark.parametrize("signed", [True, False])
def test_hamming_matches_reference(seed, bits, signed):
    rng = np.random.default_rng(seed)
    queries = random_codes(rng, 7, bits, signed)
    db = random_codes(rng, 23, bits, signed)
    out = hamming_distances(queries, db)
    assert out.dtype == np.int32
    assert out.shape == (7, 23)
    np.testing.assert_array_equal(out, ref_hamming(queries, db))


def test_hamming_mixed_input_forms_agree():
    # The same codes as {-1,+1} floats on one side and bools on the other.
    rng = np.random.default_rng(5)
    bits01 = rng.integers(0, 2, size=(6, 13))
    signed = (2 * bits01 - 1).astype(np.float64)
    np.testing.assert_array_equal(
        hamming_distances(signed, bits01.astype(bool)), ref_hamming(bits01, bits01)
    )
    assert np.all(np.diag(hamming_distances(signed, bits01.astype(bool))) == 0)


@pytest.mark.parametrize("block_rows", [1, 3, 4, 100])
def test_hamming_blocks_agree_with_reference(block_rows):
    rng = np.random.default_rng(11)
    queries = random_codes(rng, 10, 13, signed=True)
    db = random_codes(rng, 37, 13, signed=False)
    out = hamming_distances(queries, db, block_rows=block_rows)
    np.testing.assert_array_equal(out, ref_hamming(queries, db))


def test_hamming_rejects_mismatched_bit_lengths():
    with pytest.raises(ValueError, match=r"12 bits.*13 bits"):
        hamming_distances(np.ones((2, 12)), np.ones((3, 13)))


def test_hamming_rejects_non_binary_codes():
    with pytest.raises(ValueError):
        hamming_distances(np.full((2, 8), 0.5), np.ones((3, 8)))


def test_hamming_rejects_bad_block_rows():
    with pytest.raises(ValueError, match="block_rows"):
        hamming_distances(np.ones((2, 8)), np.ones((3, 8)), block_rows=0)


# --- rank ------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_rank_matches_reference_with_many_ties(seed):
    rng = np.random.default_rng(seed)
    # 8-bit codes over 200 items: only 9 distinct distances, so ties abound.
    dist = hamming_distances(random_codes(rng, 5, 8, True), random_codes(rng, 200, 8, True))
    ids = rng.permutation(1000)[:200]  # unsorted custom ids
    for db_ids, ref_ids in ((None, list(range(200))), (ids, list(ids))):
        order = rank(dist, db_ids=db_ids)
        assert order.dtype == np.int64
        for q in range(5):
            assert list(order[q]) == ref_rank_row(list(dist[q]), ref_ids)


@pytest.mark.parametrize("seed", [0, 1])
def test_rank_descending_float_scores(seed):
    rng = np.random.default_rng(seed)
    # Rounded scores so that equal similarities occur often.
    scores = np.round(rng.normal(size=(4, 100)), 1)
    ids = rng.permutation(100) + 50
    order = rank(scores, db_ids=ids, descending=True)
    for q in range(4):
        assert list(order[q]) == ref_rank_row(list(scores[q]), list(ids), descending=True)


def test_rank_ties_broken_by_id():
    dist = np.array([[3, 1, 1, 0, 1]])
    # Default ids: items 1, 2, 4 tie at distance 1 and keep index order.
    np.testing.assert_array_equal(rank(dist), [[3, 1, 2, 4, 0]])
    # Custom unsorted ids: item 4 (id 2) < item 2 (id 7) < item 1 (id 9).
    np.testing.assert_array_equal(rank(dist, db_ids=[0, 9, 7, 5, 2]), [[3, 4, 2, 1, 0]])
    # Descending: highest score first, ties by id still ascending.
    np.testing.assert_array_equal(
        rank(dist, db_ids=[0, 9, 7, 5, 2], descending=True), [[0, 4, 2, 1, 3]]
    )


def test_rank_descending_unsigned_scores():
    # Negating unsigned ints would wrap around; must still rank high scores first.
    scores = np.array([[1, 5, 0, 5]], dtype=np.uint8)
    np.testing.assert_array_equal(rank(scores, descending=True), [[1, 3, 0, 2]])


def test_rank_rejects_bad_db_ids():
    with pytest.raises(ValueError, match="db_ids"):
        rank(np.zeros((2, 3)), db_ids=[0, 1])


# --- relevance_from_labels -----------------------------------------------------------


def test_relevance_single_label():
    rel = relevance_from_labels(np.array([0, 2]), np.array([2, 0, 2, 1]))
    np.testing.assert_array_equal(rel, [[False, True, False, False], [True, False, True, False]])


@pytest.mark.parametrize("seed", [0, 1])
def test_relevance_multi_label_matches_reference(seed):
    rng = np.random.default_rng(seed)
    q = (rng.random((6, 5)) < 0.3).astype(int)
    d = (rng.random((30, 5)) < 0.3).astype(int)
    ref = [[any(a and b for a, b in zip(qi, dj)) for dj in d] for qi in q]
    rel = relevance_from_labels(q, d)
    assert rel.dtype == bool
    np.testing.assert_array_equal(rel, ref)


def test_relevance_rejects_mismatched_labels():
    with pytest.raises(ValueError, match="1-D"):
        relevance_from_labels(np.array([0, 1]), np.ones((3, 2)))
    with pytest.raises(ValueError, match="classes"):
        relevance_from_labels(np.ones((2, 3)), np.ones((3, 4)))


# --- average_precision / mAP -----------------------------------------------------------


def test_average_precision_hand_cases():
    rel = np.array(
        [
            [1, 0, 1, 0],  # hits at 1 and 3: (1/1 + 2/3) / 2 = 5/6
            [0, 1, 1, 0],  # hits at 2 and 3: (1/2 + 2/3) / 2 = 7/12
            [0, 0, 0, 0],  # no relevant item: 0
        ],
        dtype=bool,
    )
    np.testing.assert_allclose(average_precision(rel), [5 / 6, 7 / 12, 0.0])
    # AP@2: row 0 has one hit in the top 2 -> (1/1)/1 = 1; row 1 -> (1/2)/1 = 1/2.
    np.testing.assert_allclose(average_precision(rel, k=2), [1.0, 0.5, 0.0])
    # AP@1 of [0, 1] is 0: nothing relevant in the top 1.
    np.testing.assert_allclose(average_precision(np.array([[0, 1]], dtype=bool), k=1), [0.0])
    assert average_precision(rel).dtype == np.float64


def test_map_hand_case_with_ties():
    # Query 0: items 0 and 1 tie at distance 1, id order puts item 0 (irrelevant)
    # first, then item 1 (relevant), then item 2 (relevant, distance 2):
    # ranked [0, 1, 1] -> AP = (1/2 + 2/3) / 2 = 7/12.
    # Query 1: no relevant item -> AP 0 and still counted: mAP = 7/24.
    dist = np.array([[1, 1, 2], [0, 1, 2]])
    rel = np.array([[0, 1, 1], [0, 0, 0]], dtype=bool)
    assert mean_average_precision(dist, rel) == pytest.approx(7 / 24)
    # With ids [5, 2, 9] item 1 comes first: ranked [1, 0, 1] -> (1 + 2/3)/2 = 5/6.
    assert mean_average_precision(dist, rel, db_ids=[5, 2, 9]) == pytest.approx(5 / 12)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [None, 1, 5, 50, 500])
def test_map_matches_reference(seed, k):
    rng = np.random.default_rng(seed)
    dist = hamming_distances(random_codes(rng, 6, 8, True), random_codes(rng, 200, 8, False))
    rel = rng.random((6, 200)) < 0.15
    rel[0] = False  # a query with no relevant item
    ids = rng.permutation(200) * 3
    for db_ids in (None, ids):
        ref_ids = list(range(200)) if db_ids is None else list(db_ids)
        expected = ref_map(dist.tolist(), rel.tolist(), k, ref_ids, False)
        assert mean_average_precision(dist, rel, k=k, db_ids=db_ids) == pytest.approx(expected)


@pytest.mark.parametrize("k", [None, 5, 50])
def test_map_descending_float_scores_matches_reference(k):
    rng = np.random.default_rng(7)
    scores = np.round(rng.uniform(-1, 1, size=(5, 120)), 1)
    rel = rng.random((5, 120)) < 0.2
    ids = rng.permutation(120)
    expected = ref_map(scores.tolist(), rel.tolist(), k, list(ids), True)
    got = mean_average_precision(scores, rel, k=k, db_ids=ids, descending=True)
    assert got == pytest.approx(expected)


# --- precision_at_k ------------------------------------------------------------------


def test_precision_at_k_hand_case():
    # Ranked relevance [1, 0, 1] (tie at distance 0 broken by id) and [0, 0, 1].
    dist = np.array([[0, 0, 1], [2, 0, 1]])
    rel = np.array([[1, 0, 1], [1, 0, 0]], dtype=bool)
    # P@2 = (1/2 + 0/2) / 2 = 1/4
    assert precision_at_k(dist, rel, k=2) == pytest.approx(0.25)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("k", [1, 5, 50])
def test_precision_at_k_matches_reference(seed, k):
    rng = np.random.default_rng(seed)
    dist = hamming_distances(random_codes(rng, 6, 8, False), random_codes(rng, 200, 8, False))
    rel = rng.random((6, 200)) < 0.3
    ids = rng.permutation(200)
    expected = ref_precision_at_k(dist.tolist(), rel.tolist(), k, list(ids), False)
    assert precision_at_k(dist, rel, k, db_ids=ids) == pytest.approx(expected)
    scores = np.round(rng.normal(size=(6, 200)), 1)
    expected = ref_precision_at_k(scores.tolist(), rel.tolist(), k, list(ids), True)
    assert precision_at_k(scores, rel, k, db_ids=ids, descending=True) == pytest.approx(expected)


# --- recall_at_k / mean_recall -----------------------------------------------------------


def test_recall_at_1_tie_broken_by_id():
    dist = np.array([[1.0, 1.0, 3.0]])
    gt = np.array([[False, True, False]])
    # Default ids: item 0 wins the tie, and it is not ground truth.
    assert recall_at_k(dist, gt, ks=(1, 2)) == {1: 0.0, 2: 100.0}
    # ids [5, 2, 0]: item 1 (id 2) beats item 0 (id 5) in the tie.
    assert recall_at_k(dist, gt, ks=(1,), db_ids=[5, 2, 0]) == {1: 100.0}


def test_recall_at_k_hand_case_percent():
    # Query 0 hits at rank 1, query 1 at rank 3, query 2 has no ground truth.
    scores = np.array([[0.9, 0.1, 0.5], [0.9, 0.1, 0.5], [0.3, 0.2, 0.1]])
    gt = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 0]], dtype=bool)
    got = recall_at_k(scores, gt, ks=(1, 5, 10), descending=True)
    assert got == pytest.approx({1: 100 / 3, 5: 200 / 3, 10: 200 / 3})


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recall_at_k_matches_reference(seed):
    rng = np.random.default_rng(seed)
    scores = np.round(rng.normal(size=(20, 60)), 1)
    gt = np.zeros((20, 60), dtype=bool)
    gt[np.arange(20), rng.integers(0, 60, size=20)] = True  # one match per query
    gt[3, :5] = True  # and one query with several
    ids = rng.permutation(60)
    got = recall_at_k(scores, gt, ks=(1, 5, 10), db_ids=ids, descending=True)
    for k in (1, 5, 10):
        expected = ref_recall_at_k(scores.tolist(), gt.tolist(), k, list(ids), True)
        assert got[k] == pytest.approx(expected)


def test_mean_recall_is_mean_of_six_figures():
    r_t2i = {1: 10.0, 5: 20.0, 10: 30.0}
    r_i2t = {1: 40.0, 5: 50.0, 10: 60.0}
    assert mean_recall(r_t2i, r_i2t) == pytest.approx(35.0)  # 210 / 6
    with pytest.raises(ValueError, match="10"):
        mean_recall({1: 1.0, 5: 2.0}, r_i2t)


# --- precision_recall_curve ------------------------------------------------------------


def test_pr_curve_hand_case():
    # 2 bits; db = [00, 01, 11].
    # q0 = 00, distances [0, 1, 2], relevant {0, 2}:
    #   r=0: P 1/1, R 1/2; r=1: P 1/2, R 1/2; r=2: P 2/3, R 1.
    # q1 = 10, distances [1, 2, 1], relevant {1}:
    #   r=0: retrieves nothing (left out of P), R 0; r=1: P 0/2, R 0; r=2: P 1/3, R 1.
    db = np.array([[0, 0], [0, 1], [1, 1]])
    queries = np.array([[0, 0], [1, 0]])
    rel = np.array([[1, 0, 1], [0, 1, 0]], dtype=bool)
    curve = precision_recall_curve(queries, db, rel)
    np.testing.assert_array_equal(curve["radius"], [0, 1, 2])
    np.testing.assert_allclose(curve["precision"], [1.0, 0.25, 0.5])
    np.testing.assert_allclose(curve["recall"], [0.25, 0.25, 1.0])


def test_pr_curve_nothing_retrieved_and_no_relevant():
    # The only query is at distance 1 from every item: nothing within radius 0, so
    # precision is 0 there. Query 1 has no relevant item: left out of recall.
    db = np.array([[1, 0], [0, 1]])
    queries = np.array([[0, 0], [1, 1]])
    rel = np.array([[True, False], [False, False]])
    curve = precision_recall_curve(queries, db, rel)
    # r=1: q0 P 1/2, q1 P 0/2 -> 1/4; r=2 same. Recall (q0 only): 0, 1, 1.
    np.testing.assert_allclose(curve["precision"], [0.0, 0.25, 0.25])
    np.testing.assert_allclose(curve["recall"], [0.0, 1.0, 1.0])


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("bits", [8, 13])
def test_pr_curve_matches_reference(seed, bits):
    rng = np.random.default_rng(seed)
    queries = random_codes(rng, 6, bits, True)
    db = random_codes(rng, 80, bits, False)
    rel = rng.random((6, 80)) < 0.2
    rel[2] = False  # a query with no relevant item
    curve = precision_recall_curve(queries, db, rel)
    precision, recall = ref_pr_curve(queries.tolist(), db.tolist(), rel.tolist())
    np.testing.assert_array_equal(curve["radius"], np.arange(bits + 1))
    np.testing.assert_allclose(curve["precision"], precision)
    np.testing.assert_allclose(curve["recall"], recall)


# --- input errors ---------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, -1, 2.5, True])
def test_bad_k_is_rejected(k):
    dist = np.zeros((2, 4))
    rel = np.ones((2, 4), dtype=bool)
    with pytest.raises(ValueError, match="k must be"):
        average_precision(rel, k=k)
    with pytest.raises(ValueError, match="k must be"):
        mean_average_precision(dist, rel, k=k)
    with pytest.raises(ValueError, match="k must be"):
        precision_at_k(dist, rel, k=k)
    with pytest.raises(ValueError, match="k must be"):
        recall_at_k(dist, rel, ks=(1, k))


def test_relevance_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="shape"):
        mean_average_precision(np.zeros((2, 4)), np.ones((2, 5), dtype=bool))
    with pytest.raises(ValueError, match="shape"):
        recall_at_k(np.zeros((2, 4)), np.ones((3, 4), dtype=bool))
    with pytest.raises(ValueError, match="shape"):
        precision_recall_curve(np.ones((2, 8)), np.ones((4, 8)), np.ones((2, 3), dtype=bool))


def test_non_binary_relevance_is_rejected():
    with pytest.raises(ValueError, match="0/1"):
        average_precision(np.array([[0.5, 1.0]]))
