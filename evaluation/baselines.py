"""Baselines of the report, on the same split and the same frozen features as the models.

- ``lsh_codes``: random-hyperplane LSH (Charikar, 2002): sign((x - mean) W) with Gaussian W.
- ``ITQ``: iterative quantization (Gong and Lazebnik, 2011): PCA to ``bits`` dimensions, then an
  orthogonal rotation R alternating B = sign(V R) and R from the SVD of V^T B, which lowers the
  quantization loss ||B - V R||^2 at every step.
- ``pq_scores``: a FAISS product-quantization index (``IndexPQ``) of L2-normalised vectors; its
  approximate squared distances d give the cosine estimate 1 - d / 2.
- ``fuse``: the multimodal patent retrieval paper's late fusion of per-modality scores of every
  database item, by their average or maximum, ranked and measured by AP@50.

Means, PCA and rotations are fitted on the database (train + val) only, never on the test queries.
"""
from __future__ import annotations

import numpy as np

FUSIONS = ("average", "maximum")


def lsh_codes(features: np.ndarray, bits: int, fit_rows: np.ndarray, seed: int = 0) -> np.ndarray:
    """(N, bits) sign codes (int8 +-1) of every row of ``features`` (N, D), centred on the mean of
    ``fit_rows``."""
    features = np.asarray(features, dtype=np.float64)
    planes = np.random.default_rng(seed).standard_normal((features.shape[1], bits))
    return np.where((features - features[fit_rows].mean(axis=0)) @ planes >= 0, 1, -1).astype(np.int8)


class ITQ:
    """Iterative quantization; ``fit`` on database rows, ``codes`` of any rows."""

    def __init__(self, bits: int, iterations: int = 50, seed: int = 0):
        self.bits, self.iterations, self.seed = bits, iterations, seed
        self.losses: list[float] = []  # quantization loss after each iteration

    def fit(self, features: np.ndarray) -> "ITQ":
        features = np.asarray(features, dtype=np.float64)
        if features.shape[1] < self.bits:
            raise ValueError(f"ITQ needs at least {self.bits} feature dimensions, got {features.shape[1]}")
        self.mean = features.mean(axis=0)
        centred = features - self.mean
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        self.projection = vt[: self.bits].T  # (D, bits) top principal directions
        v = centred @ self.projection
        rotation, _ = np.linalg.qr(np.random.default_rng(self.seed).standard_normal((self.bits, self.bits)))
        for _ in range(self.iterations):
            b = np.where(v @ rotation >= 0, 1.0, -1.0)
            u, _, wt = np.linalg.svd(v.T @ b)
            rotation = u @ wt  # argmin over orthogonal R of ||B - V R||
            self.losses.append(float(np.square(np.where(v @ rotation >= 0, 1.0, -1.0) - v @ rotation).sum()))
        self.rotation = rotation
        return self

    def project(self, features: np.ndarray) -> np.ndarray:
        return (np.asarray(features, dtype=np.float64) - self.mean) @ self.projection @ self.rotation

    def codes(self, features: np.ndarray) -> np.ndarray:
        return np.where(self.project(features) >= 0, 1, -1).astype(np.int8)


def _normalised(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def pq_scores(queries: np.ndarray, database: np.ndarray, m: int = 16, nbits: int = 8, seed: int = 0) -> np.ndarray:
    """(Q, N) cosine estimates of every query against every database vector through a FAISS PQ index
    of ``m`` sub-quantizers of ``nbits`` bits, trained on the database vectors."""
    import faiss

    db = _normalised(database)
    dim = db.shape[1]
    if dim % m:
        raise ValueError(f"{m} sub-quantizers do not divide {dim} dimensions")
    if len(db) < 2 ** nbits:
        raise ValueError(f"a PQ of {nbits}-bit sub-quantizers needs at least {2 ** nbits} training vectors, "
                         f"got {len(db)}")
    index = faiss.IndexPQ(dim, m, nbits)
    index.pq.cp.seed = seed
    index.pq.cp.max_points_per_centroid = max(256, len(db))  # train on every vector, not a sample
    index.pq.cp.min_points_per_centroid = 1  # a small database is all there is: no faiss warning per sub-quantizer
    index.train(db)
    index.add(db)
    distances, rows = index.search(_normalised(queries), len(db))
    out = np.empty_like(distances)
    np.put_along_axis(out, rows, 1.0 - distances / 2.0, axis=1)  # |a - b|^2 = 2 - 2 cos for unit vectors
    return out.astype(np.float64)


def fuse(first: np.ndarray, second: np.ndarray, how: str) -> np.ndarray:
    """Late fusion of two (Q, N) score matrices: their average or element-wise maximum."""
    if how == "average":
        return (np.asarray(first) + np.asarray(second)) / 2.0
    if how == "maximum":
        return np.maximum(first, second)
    raise ValueError(f"unknown fusion {how!r}; known: {', '.join(FUSIONS)}")


def mean_caption_vectors(caption_vectors: np.ndarray, captions_of: list[np.ndarray], rows: np.ndarray) -> np.ndarray:
    """(len(rows), D) mean of each image's caption vectors (its text modality)."""
    return np.stack([np.asarray(caption_vectors)[np.asarray(captions_of[r])].mean(axis=0) for r in rows])
