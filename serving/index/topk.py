"""The exact top-k order every search answers in: Hamming distance, then global row.

Plain numpy, shared by the faiss shards (serving.index.shards), the router's merge and the offline edge
searcher (serving.edge), so that all of them cut ties the same way.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MISSING_DISTANCE = int(np.iinfo(np.int32).max)  # padding when fewer than k results (faiss's own value)
MISSING_ROW = -1


def sorted_cut(distances, rows, k):
    """Sort every row of candidates by (distance, row) and keep the first k: (Q, <=k) each."""
    order = np.lexsort((rows, distances), axis=1)[:, :k]  # lexsort: the last key is the primary one
    return (np.take_along_axis(distances, order, axis=1).astype(np.int32),
            np.take_along_axis(rows, order, axis=1).astype(np.int64))


def pad(distances, rows, k):
    """Pad (Q, m) results to (Q, k) with the missing markers."""
    missing = k - distances.shape[1]
    if missing <= 0:
        return distances, rows
    q = distances.shape[0]
    return (np.hstack([distances, np.full((q, missing), MISSING_DISTANCE, np.int32)]),
            np.hstack([rows, np.full((q, missing), MISSING_ROW, np.int64)]))


def merge_topk(per_shard_results: Sequence[tuple[np.ndarray, np.ndarray]], k: int):
    """Global top-k from every shard's (distances (Q, k_i), rows (Q, k_i)), ordered by (distance, row).

    Exact when each shard's list is its own exact top-k under the same order: the global top-k is
    then contained in their union. Missing places sort last and pad the result to (Q, k).
    """
    if not per_shard_results:
        raise ValueError("merge_topk needs the results of at least one shard")
    distances = np.concatenate([np.asarray(d, np.int32) for d, _ in per_shard_results], axis=1)
    rows = np.concatenate([np.asarray(r, np.int64) for _, r in per_shard_results], axis=1)
    return pad(*sorted_cut(distances, rows, k), k)
