"""Baselines against plain references: LSH as the written formula, ITQ's loss falling under an
orthogonal rotation, a PQ index whose codebooks are exact giving exact cosines, and the late
fusion's AP@50 against a loop over the ranking."""
import numpy as np
import pytest

from evaluation import metrics
from evaluation.baselines import ITQ, fuse, lsh_codes, mean_caption_vectors, pq_scores
from tests.evaluation.test_metrics import ref_ap


def _clusters(rng, n_per: int, classes: int, dim: int, spread: float = 0.6):
    centres = rng.standard_normal((classes, dim)) * 3
    labels = np.repeat(np.arange(classes), n_per)
    return centres[labels] + spread * rng.standard_normal((len(labels), dim)), labels


def test_lsh_is_the_sign_of_centred_features_on_random_planes():
    rng = np.random.default_rng(0)
    x, _ = _clusters(rng, 20, 3, 12)
    fit = np.arange(0, 60, 2)
    planes = np.random.default_rng(5).standard_normal((12, 16))
    want = np.where((x - x[fit].mean(axis=0)) @ planes >= 0, 1, -1)
    assert np.array_equal(lsh_codes(x, 16, fit, seed=5), want)
    assert not np.array_equal(lsh_codes(x, 16, fit, seed=6), want)


def test_itq_lowers_its_quantization_loss_with_an_orthogonal_rotation():
    rng = np.random.default_rng(1)
    x, labels = _clusters(rng, 40, 4, 24)
    itq = ITQ(16, iterations=30, seed=0).fit(x)
    assert np.allclose(itq.rotation.T @ itq.rotation, np.eye(16), atol=1e-8)
    assert all(b <= a + 1e-6 for a, b in zip(itq.losses, itq.losses[1:])), itq.losses  # never rises
    v = (x - itq.mean) @ itq.projection
    pca_loss = np.square(np.where(v >= 0, 1.0, -1.0) - v).sum()  # no rotation
    assert itq.losses[-1] < pca_loss
    codes = itq.codes(x)
    assert codes.dtype == np.int8 and set(np.unique(codes)) <= {-1, 1}
    relevance = metrics.relevance_from_labels(labels, labels)
    assert metrics.mean_average_precision(metrics.hamming_distances(codes, codes), relevance) > 0.9
    with pytest.raises(ValueError, match="at least 32 feature dimensions"):
        ITQ(32).fit(x)


def test_pq_with_exact_codebooks_gives_exact_cosines_and_approximates_otherwise():
    rng = np.random.default_rng(2)
    db = rng.standard_normal((16, 8)).astype(np.float32)
    queries = rng.standard_normal((5, 8)).astype(np.float32)
    unit = lambda v: v / np.linalg.norm(v, axis=1, keepdims=True)  # noqa: E731
    exact = unit(queries) @ unit(db).T
    # 16 vectors, 16 centroids per sub-quantizer: every sub-vector is its own centroid.
    assert np.allclose(pq_scores(queries, db, m=4, nbits=4), exact, atol=1e-4)

    x, labels = _clusters(rng, 100, 5, 32)
    relevance = metrics.relevance_from_labels(labels[:50], labels)
    approx = metrics.mean_average_precision(pq_scores(x[:50], x, m=8, nbits=4), relevance, k=50, descending=True)
    cosine = metrics.mean_average_precision(unit(x[:50]) @ unit(x).T, relevance, k=50, descending=True)
    assert abs(approx - cosine) < 0.05
    with pytest.raises(ValueError, match="do not divide"):
        pq_scores(queries, db, m=3, nbits=4)
    with pytest.raises(ValueError, match="at least 256 training vectors"):
        pq_scores(queries, db, m=4, nbits=8)


def _plain_ap_at_50(scores: np.ndarray, relevant: np.ndarray) -> float:
    aps = []
    for row, rel in zip(scores, relevant):
        order = sorted(range(len(row)), key=lambda i: (-row[i], i))[:50]
        aps.append(ref_ap(rel[i] for i in order))
    return float(np.mean(aps))


def test_late_fusion_by_average_and_maximum_and_its_ap_at_50():
    rng = np.random.default_rng(3)
    image, text = rng.random((6, 80)), rng.random((6, 80))
    assert np.array_equal(fuse(image, text, "average"), (image + text) / 2)
    assert np.array_equal(fuse(image, text, "maximum"), np.where(image > text, image, text))
    labels_q, labels_db = rng.integers(0, 3, 6), rng.integers(0, 3, 80)
    relevance = metrics.relevance_from_labels(labels_q, labels_db)
    for how in ("average", "maximum"):
        fused = fuse(image, text, how)
        got = metrics.mean_average_precision(fused, relevance, k=50, descending=True)
        assert got == pytest.approx(_plain_ap_at_50(fused, relevance))
    with pytest.raises(ValueError, match="unknown fusion 'sum'"):
        fuse(image, text, "sum")
    vectors = rng.random((10, 4))
    means = mean_caption_vectors(vectors, [np.array([0, 1]), np.array([2, 3, 4])], np.array([1, 0]))
    assert np.allclose(means, [vectors[2:5].mean(axis=0), vectors[0:2].mean(axis=0)])
