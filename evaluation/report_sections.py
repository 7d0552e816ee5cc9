"""The report's sections that need no model of their own: baselines, fairness, the Pareto front
(with latency and energy measured on faiss indexes of this run), drift and the examples' rankings.

Every function takes arrays (codes, features, labels) and returns plain JSON-able dicts;
``evaluation.report`` feeds them the models' codes. Relevance is by class; the queries are the
test rows, the database train + val; nothing here fits on a test row.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence

import numpy as np

from serving.index.drift import BitDrift, alarm_rate, choose_threshold

from . import metrics
from .baselines import FUSIONS, ITQ, _normalised, fuse, lsh_codes, pq_scores
from .fairness import most_confused, top_k_confusion
from .pareto import AXES, non_dominated
from .retrieval import scores, signs

log = logging.getLogger(__name__)


def class_figures(score: np.ndarray, descending: bool, q_labels: np.ndarray, db_labels: np.ndarray,
                  class_names: Sequence[str]) -> dict:
    """mAP@all, mAP@50 (AP@50), P@10 and per-class mAP@all of a (Q, N) score matrix."""
    rel = metrics.relevance_from_labels(q_labels, db_labels)
    k50 = min(50, score.shape[1])
    per_class = metrics.per_class_average_precision(score, rel, q_labels, descending=descending)
    return {"map_all": metrics.mean_average_precision(score, rel, descending=descending),
            "map_50": metrics.mean_average_precision(score, rel, k=k50, descending=descending),
            "p_at_10": metrics.precision_at_k(score, rel, k=10, descending=descending),
            "per_class": {str(class_names[int(label)]): value for label, value in per_class.items()}}


def hamming_similarity(queries: np.ndarray, db: np.ndarray) -> np.ndarray:
    """1 - Hamming distance / bits of sign codes, in [0, 1] (so that two modalities' scores fuse)."""
    return 1.0 - metrics.hamming_distances(signs(queries), signs(db)) / queries.shape[1]


def pq_subquantizers(dim: int) -> int:
    return next(m for m in (16, 12, 8, 6, 4, 3, 2, 1) if dim % m == 0)


def baselines(image_features: np.ndarray, caption_features: np.ndarray, q_rows: np.ndarray, db_rows: np.ndarray,
              labels: np.ndarray, bits: Sequence[int], class_names: Sequence[str], seed: int = 0) -> dict:
    """Image-to-image baselines on the frozen image features (N, D): LSH and ITQ at each of ``bits``
    (fitted on the database rows), float cosine, and a FAISS PQ index; and the multimodal paper's
    method: a PQ index per modality (the image's features, the mean of its captions' features),
    each query an image with its captions, scored by the average or the maximum of both scores.
    ``caption_features``: (len(labels), D') mean caption features of each image (None: image-only)."""
    q_labels, db_labels = labels[q_rows], labels[db_rows]
    feats = np.asarray(image_features, dtype=np.float64)
    methods = {}
    for b in sorted(set(bits)):
        codes = lsh_codes(feats, b, db_rows, seed=seed)
        methods[f"lsh-{b}"] = {"kind": "lsh", "bits": b, "bytes_per_item": b // 8,
                               **class_figures(*scores(codes[q_rows], codes[db_rows], "hamming"), q_labels,
                                               db_labels, class_names)}
        if feats.shape[1] >= b:
            itq = ITQ(b, seed=seed).fit(feats[db_rows])
            codes = itq.codes(feats)
            methods[f"itq-{b}"] = {"kind": "itq", "bits": b, "bytes_per_item": b // 8,
                                   **class_figures(*scores(codes[q_rows], codes[db_rows], "hamming"), q_labels,
                                                   db_labels, class_names)}
    dim = feats.shape[1]
    methods["cosine"] = {"kind": "float", "bits": None, "bytes_per_item": 4 * dim,
                         **class_figures(*scores(feats[q_rows], feats[db_rows], "cosine"), q_labels, db_labels,
                                         class_names)}
    m, nbits = pq_subquantizers(dim), int(min(8, np.log2(len(db_rows))))
    image_pq = pq_scores(feats[q_rows], feats[db_rows], m=m, nbits=nbits, seed=seed)
    methods["pq"] = {"kind": "pq", "bits": m * nbits, "bytes_per_item": m * nbits // 8, "m": m, "nbits": nbits,
                     **class_figures(image_pq, True, q_labels, db_labels, class_names)}
    out = {"methods": methods, "image_dim": dim, "fit_on": "database rows (train + val)"}
    if caption_features is not None:
        text_dim = caption_features.shape[1]
        text_pq = pq_scores(caption_features[q_rows], caption_features[db_rows], m=pq_subquantizers(text_dim),
                            nbits=nbits, seed=seed)
        out["fusion_pq"] = fusion_figures(image_pq, text_pq, q_labels, db_labels, class_names)
        out["text_dim"] = text_dim
    return out


def fusion_figures(image_scores: np.ndarray, text_scores: np.ndarray, q_labels, db_labels, class_names) -> dict:
    """{"image", "text", "average", "maximum"}: figures of each modality's scores and of their fusions."""
    out = {"image": class_figures(image_scores, True, q_labels, db_labels, class_names),
           "text": class_figures(text_scores, True, q_labels, db_labels, class_names)}
    for how in FUSIONS:
        out[how] = class_figures(fuse(image_scores, text_scores, how), True, q_labels, db_labels, class_names)
    return out


def mean_caption_codes(captions: np.ndarray, captions_of: list[np.ndarray], rows: np.ndarray) -> np.ndarray:
    """(len(rows), bits) the mean of each image's caption codes (continuous), its text modality."""
    return np.stack([captions[np.asarray(captions_of[r])].mean(axis=0) for r in rows])


def fairness(per_class: dict[str, dict[str, float]]) -> dict:
    """{entry: {"per_class", "worst", "worst_ap", "mean", "gap"}} for each entry's per-class mAP@all."""
    out = {}
    for name, values in per_class.items():
        worst = metrics.worst_class(values)
        out[name] = {"per_class": values, "worst": worst["class"], "worst_ap": worst["value"], "mean": worst["mean"],
                     "gap": worst["gap"]}
    return out


def confusion(q_codes: np.ndarray, db_codes: np.ndarray, q_labels, db_labels, class_names, k: int = 10) -> dict:
    """The share of each class's top-``k`` Hamming results in each class, and the pairs confused most."""
    matrix = top_k_confusion(metrics.hamming_distances(signs(q_codes), signs(db_codes)), q_labels, db_labels,
                             len(class_names), k=k)
    return {"k": k, "matrix": np.round(matrix, 6).tolist(), "most_confused": most_confused(matrix, class_names)}


@contextlib.contextmanager
def energy_meter(result: dict):
    """Energy of the block in Wh (``result["wh"]``) and how it was obtained (``result["method"]``),
    by codecarbon as training measures it; None where codecarbon is missing or measures nothing."""
    result.update(wh=None, method="not measured (codecarbon missing)")
    try:
        from codecarbon import OfflineEmissionsTracker
    except ImportError:
        yield result
        return
    logging.getLogger("codecarbon").setLevel(logging.ERROR)
    tracker = OfflineEmissionsTracker(country_iso_code="FRA", log_level="error", tracking_mode="machine",
                                      output_methods=[], emissions_endpoint=None, electricitymaps_api_token=None,
                                      project_name="terrahash-report")
    tracker.start()
    try:
        yield result
    finally:
        tracker.stop()
        data = getattr(tracker, "final_emissions_data", None)
        if data is not None:
            from training.tracking import power_sources

            result["wh"] = float(data.energy_consumed) * 1000.0
            result["method"] = "; ".join(f"{d}: {n}" for d, (n, _) in sorted(power_sources(tracker).items())) or "codecarbon"


def grow(vectors: np.ndarray, size: int, seed: int, binary: bool) -> np.ndarray:
    """A database of ``size`` rows made of copies of ``vectors``, each copy perturbed (binary: 10% of
    bits flipped; float: Gaussian noise of 10% of the vectors' std), as a larger archive of the same
    scenes: what the latency of an index depends on is its size and code, not its labels."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(vectors), size)
    out = vectors[picks].copy()
    if binary:
        out = np.where(rng.random(out.shape) < 0.1, -out, out)
    else:
        out = out + rng.normal(0, 0.1 * float(vectors.std()), out.shape).astype(out.dtype)
    out[: len(vectors)] = vectors
    return out


def search_cost(index, queries: np.ndarray, k: int = 10) -> dict:
    """Latency of single-query searches (p50, p99, ms) and energy per 1,000 queries (Wh)."""
    for q in queries[:5]:  # warm-up
        index.search(q[None], k)
    times = []
    energy: dict = {}
    with energy_meter(energy):
        for q in queries:
            start = time.perf_counter()
            index.search(q[None], k)
            times.append(time.perf_counter() - start)
    times_ms = np.asarray(times) * 1000.0
    per_1k = None if energy["wh"] is None else energy["wh"] * 1000.0 / len(queries)
    return {"latency_ms_p50": float(np.percentile(times_ms, 50)), "latency_ms_p99": float(np.percentile(times_ms, 99)),
            "energy_wh_per_1k_queries": per_1k, "energy_method": energy["method"], "queries": len(queries)}


def build_index(kind: str, db: np.ndarray, seed: int = 0, m: int = 16, nbits: int = 8):
    """A faiss index of ``db``: ``binary`` (exact Hamming, IndexBinaryFlat of packed signs), ``float``
    (exact inner product of normalised vectors) or ``pq`` (IndexPQ)."""
    import faiss

    if kind == "binary":
        index = faiss.IndexBinaryFlat(db.shape[1])
        index.add(np.packbits(db > 0, axis=1))
        return index
    vectors = np.ascontiguousarray(_normalised(db))
    if kind == "float":
        index = faiss.IndexFlatIP(db.shape[1])
    else:
        index = faiss.IndexPQ(db.shape[1], m, nbits)
        index.pq.cp.seed = seed
        index.pq.cp.min_points_per_centroid = 1  # a small test database is all there is: no faiss warning
        index.train(vectors[: max(256 * 39, 2 ** nbits)])
    index.add(vectors)
    return index


def query_vectors(kind: str, queries: np.ndarray) -> np.ndarray:
    if kind == "binary":
        return np.packbits(queries > 0, axis=1)
    return np.ascontiguousarray(_normalised(queries))


def pareto(points: list[dict], costs: dict[str, dict]) -> dict:
    """The front: each point ({"name", "family", "map_all", "bytes_per_item", "index"}) with its
    index's measured costs, marked ``on_front`` when no other point beats it on every axis."""
    full = [{**p, **{k: v for k, v in costs[p["index"]].items() if k != "queries"}} for p in points]
    for point, front in zip(full, non_dominated(full, AXES)):
        point["on_front"] = front
    return {"points": full, "front": [p["name"] for p in full if p["on_front"]], "axes": AXES}


def drift(train_codes: np.ndarray, val_codes: np.ndarray, test_codes: np.ndarray, window: int,
          quantile: float = 0.99) -> tuple[BitDrift, dict]:
    """The detector (reference: train codes; threshold: the ``quantile`` of D over windows of val
    codes) and its alarm rates on clean val and test windows."""
    detector = choose_threshold(BitDrift.fit(train_codes), val_codes, window, quantile=quantile)
    return detector, {"window": window, "quantile": quantile, "threshold": detector.threshold,
                      "reference_codes": int(len(train_codes)),
                      "alarm_rate": {"clean_val": alarm_rate(detector, val_codes, window),
                                     "clean_test": alarm_rate(detector, test_codes, window)}}


def top_results(query_codes: np.ndarray, db_codes: np.ndarray, db_rows: np.ndarray, k: int = 5) -> list[list[dict]]:
    """The top ``k`` database rows of each query by Hamming distance (ties by row), with the distance."""
    distances = metrics.hamming_distances(signs(query_codes), signs(db_codes))
    order = metrics.rank(distances, db_ids=db_rows)[:, :k]
    return [[{"row": int(db_rows[j]), "distance": int(distances[i, j])} for j in row] for i, row in enumerate(order)]

