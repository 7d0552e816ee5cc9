"""The report's confusion view (beside per-class AP and the worst class, ``metrics.per_class_average_precision``
and ``metrics.worst_class``): for the queries of each class, the share of their top-k results that
belong to each class, and the pairs of classes confused most."""
from __future__ import annotations

import numpy as np

from . import metrics


def top_k_confusion(scores: np.ndarray, query_labels: np.ndarray, db_labels: np.ndarray, n_classes: int,
                    k: int = 10, descending: bool = False, exclude: np.ndarray | None = None) -> np.ndarray:
    """(C, C) float: row i = mean over class-i queries of the share of their top ``k`` results (ties
    by database id; ``exclude`` (Q, N) left out of the ranking) that are of class j. Rows of classes
    without queries are zero."""
    scores = np.asarray(scores, dtype=np.float64)
    if exclude is not None:
        scores = np.where(exclude, -np.inf if descending else np.inf, scores)
    top = metrics.rank(scores, descending=descending)[:, :k]  # (Q, k)
    counts = np.zeros((n_classes, n_classes))
    np.add.at(counts, (np.repeat(np.asarray(query_labels), top.shape[1]), np.asarray(db_labels)[top].ravel()), 1)
    per_class = np.bincount(np.asarray(query_labels), minlength=n_classes)[:, None] * top.shape[1]
    return np.divide(counts, per_class, out=np.zeros_like(counts), where=per_class > 0)


def most_confused(confusion: np.ndarray, class_names, n: int = 5) -> list[dict]:
    """The ``n`` largest off-diagonal shares: [{"query_class", "result_class", "share"}], largest first
    (ties by class order)."""
    pairs = [(-confusion[i, j], i, j) for i in range(len(confusion)) for j in range(len(confusion)) if i != j
             and confusion[i, j] > 0]
    return [{"query_class": str(class_names[i]), "result_class": str(class_names[j]), "share": float(-s)}
            for s, i, j in sorted(pairs)[:n]]

