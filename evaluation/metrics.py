"""Retrieval metrics for binary hash codes (Hamming ranking, asymmetric scores, mAP, P@k, PR curves, R@k).

The class-relevance figures (mAP, P@k) take an optional ``exclude`` mask (Q, N): database items a
query must not retrieve (itself, in a leave-one-out protocol). They are left out of that query's
ranking, as if the database did not hold them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

# Default number of (query, db) pairs per block of hamming_distances. Small blocks
# keep the per-byte temporaries (a few MiB) in cache; measured several times faster than
# one big (Q_block, N, nbytes) XOR array of 64 MiB.
_HAMMING_BLOCK_PAIRS = 1 << 20


def to_bits(codes) -> np.ndarray:
    """Normalise hash codes to a uint8 array (n, bits) of 0/1.

    Accepts {-1, +1} (float or int), {0, 1} or bool codes: +1 / 1 / True become 1,
    -1 / 0 / False become 0. Any other value (0.5, 2, NaN, ...) raises ValueError.
    """
    arr = np.asarray(codes)
    if arr.ndim != 2:
        raise ValueError(f"codes must be a 2-D array (n, bits), got shape {arr.shape}")
    if arr.shape[1] < 1:
        raise ValueError("codes must have at least one bit")
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8)
    if not (np.issubdtype(arr.dtype, np.number)):
        raise ValueError(f"codes must be numeric or bool, got dtype {arr.dtype}")
    ones = arr == 1
    zeros = (arr == 0) | (arr == -1)
    if not np.all(ones | zeros):
        bad = arr[~(ones | zeros)].ravel()[0]
        raise ValueError(
            f"codes must contain only -1/+1, 0/1 or bool values; found {bad!r}"
        )
    return ones.astype(np.uint8)


def pack_bits(codes) -> np.ndarray:
    """Pack codes into bytes: uint8 array (n, ceil(bits / 8)).

    Bit order is big-endian within each byte (np.packbits default): bit 0 of the
    code is the most significant bit of byte 0, bit 8 the most significant bit of
    byte 1, and so on. When bits is not a multiple of 8 the last byte is padded
    with zero bits at its low end, so padding never adds to a Hamming distance.
    """
    return np.packbits(to_bits(codes), axis=1)


def _popcount_table() -> np.ndarray:
    """Number of set bits of every byte value: uint8 (256,)."""
    byte_values = np.arange(256, dtype=np.uint8)[:, None]  # (256, 1)
    return np.unpackbits(byte_values, axis=1).sum(axis=1).astype(np.uint8)


def hamming_distances(query_codes, db_codes, block_rows: int | None = None) -> np.ndarray:
    """Hamming distances between every query and every database code: int32 (Q, N).

    Both sides are packed into bytes; for each byte position the query and database
    bytes are XORed and popcounted with a 256-entry table, and the counts summed.
    Queries are processed block_rows at a time so temporaries stay bounded (about
    2**20 query-database pairs per block by default); pass block_rows to force a
    block size.
    """
    query_bits = to_bits(query_codes)
    db_bits = to_bits(db_codes)
    if query_bits.shape[1] != db_bits.shape[1]:
        raise ValueError(
            f"code lengths differ: query codes have {query_bits.shape[1]} bits, "
            f"database codes have {db_bits.shape[1]} bits"
        )
    query_packed = np.packbits(query_bits, axis=1)  # (Q, nbytes)
    # Byte-major database so each byte position is one contiguous row.
    db_packed_t = np.ascontiguousarray(np.packbits(db_bits, axis=1).T)  # (nbytes, N)
    nbytes, n_db = db_packed_t.shape
    n_queries = query_packed.shape[0]

    if block_rows is None:
        block_rows = max(1, _HAMMING_BLOCK_PAIRS // max(1, n_db))
    elif not _is_int(block_rows) or block_rows < 1:
        raise ValueError(f"block_rows must be a positive integer, got {block_rows!r}")

    table = _popcount_table()
    out = np.empty((n_queries, n_db), dtype=np.int32)
    for start in range(0, n_queries, block_rows):
        block = query_packed[start : start + block_rows]  # (B, nbytes)
        acc = np.zeros((block.shape[0], n_db), dtype=np.int32)  # (B, N)
        for byte in range(nbytes):
            xor = block[:, byte, None] ^ db_packed_t[byte][None, :]  # (B, N) uint8
            acc += np.take(table, xor)
        out[start : start + block.shape[0]] = acc
    return out


def asymmetric_scores(query_codes, db_codes) -> np.ndarray:
    """Inner products of continuous query codes with binary database codes: float64 (Q, N).

    The query side is the pre-sign code (any real values); the database side is binarised as
    ``to_bits`` reads it and scored as {-1, +1}. Rank them descending (higher is closer). The
    query's scale does not change its ranking, so it is not normalised.
    """
    queries = np.asarray(query_codes, dtype=np.float64)
    if queries.ndim != 2:
        raise ValueError(f"query codes must be a 2-D array (n, bits), got shape {queries.shape}")
    if not np.isfinite(queries).all():
        raise ValueError("query codes contain NaN or infinite values")
    signs = to_bits(db_codes).astype(np.float64) * 2.0 - 1.0  # (N, bits) of -1 / +1
    if queries.shape[1] != signs.shape[1]:
        raise ValueError(f"code lengths differ: query codes have {queries.shape[1]} bits, "
                         f"database codes have {signs.shape[1]} bits")
    return queries @ signs.T  # (Q, N)


def rank(distances, db_ids=None, descending: bool = False) -> np.ndarray:
    """Rank the database for every query: int64 (Q, N) indices into the database.

    Items are sorted by distance ascending (or, with descending=True, by score
    descending, for similarities such as cosine), ties always broken by db id
    ascending. db_ids defaults to arange(N); items with equal distance and equal id
    keep their database order (np.lexsort is stable).
    """
    distances = _as_matrix(distances, "distances")
    n_queries, n_db = distances.shape
    ids = _db_ids(db_ids, n_db)

    primary = distances
    if np.issubdtype(primary.dtype, np.floating) and np.isnan(primary).any():
        raise ValueError("distances contain NaN; ranking would be ill-defined")
    if descending:
        # Negate in a signed type: negating unsigned ints would wrap around.
        if not np.issubdtype(primary.dtype, np.floating):
            primary = primary.astype(np.float64)
        primary = -primary
    tie_key = np.broadcast_to(ids, (n_queries, n_db))  # (Q, N)
    # lexsort sorts by the last key first, so the id only decides ties.
    return np.lexsort((tie_key, primary), axis=1).astype(np.int64)


def relevance_from_labels(query_labels, db_labels) -> np.ndarray:
    """Relevance of every database item to every query: bool (Q, N).

    Single-label (1-D label arrays): relevant when the labels are equal.
    Multi-label (2-D 0/1 arrays (n, classes)): relevant when they share at least
    one label.
    """
    query_labels = np.asarray(query_labels)
    db_labels = np.asarray(db_labels)
    if query_labels.ndim != db_labels.ndim:
        raise ValueError(
            f"query labels are {query_labels.ndim}-D but database labels are "
            f"{db_labels.ndim}-D; both must be 1-D (single-label) or 2-D (multi-label)"
        )
    if query_labels.ndim == 1:
        return query_labels[:, None] == db_labels[None, :]  # (Q, N)
    if query_labels.ndim != 2:
        raise ValueError(f"labels must be 1-D or 2-D, got {query_labels.ndim}-D")
    if query_labels.shape[1] != db_labels.shape[1]:
        raise ValueError(
            f"label widths differ: query labels have {query_labels.shape[1]} classes, "
            f"database labels have {db_labels.shape[1]}"
        )
    query_onehot = _as_bool(query_labels, "query_labels").astype(np.float32)
    db_onehot = _as_bool(db_labels, "db_labels").astype(np.float32)
    # Float32 matmul uses BLAS and counts shared labels exactly (counts << 2**24).
    return (query_onehot @ db_onehot.T) > 0  # (Q, N)


def average_precision(ranked_relevance, k: int | None = None) -> np.ndarray:
    """Average precision of every query: float64 (Q,).

    ranked_relevance is bool (Q, N), each row already in ranked order. Following
    the deep hashing literature (HashNet, DHD):

        AP@k = sum_{i<=k} P@i * rel_i / (number of relevant items in the top k)

    so the denominator counts the relevant items *retrieved* in the top k, not all
    relevant items. A query with no relevant item in its top k gets AP 0 (and still
    counts when averaging). k=None means the whole ranking, where the denominator
    is all relevant items; a k larger than N is treated as N.
    """
    ranked = _as_bool(_as_matrix(ranked_relevance, "ranked_relevance"), "ranked_relevance")
    n_queries, n_db = ranked.shape
    k = _check_k(k, n_db, allow_none=True)
    if k == 0:  # empty database: nothing can be relevant
        return np.zeros(n_queries, dtype=np.float64)

    rel = ranked[:, :k].astype(np.float64)  # (Q, k)
    hits = np.cumsum(rel, axis=1)  # (Q, k) relevant items up to each position
    precision = hits / np.arange(1, k + 1, dtype=np.float64)  # (Q, k) P@i
    n_relevant = hits[:, -1]  # (Q,)
    summed = (precision * rel).sum(axis=1)  # (Q,)
    return np.divide(summed, n_relevant, out=np.zeros(n_queries), where=n_relevant > 0)


def mean_average_precision(
    distances, relevance, k: int | None = None, db_ids=None, descending: bool = False, exclude=None
) -> float:
    """mAP@k: rank with `rank`, then average `average_precision` over queries.

    See average_precision for the AP@k convention (k=None: whole ranking); ``exclude`` (Q, N):
    items left out of each query's ranking (module docstring).
    """
    ranked, _ = _ranked_relevance(distances, relevance, db_ids, descending, k, allow_none=True, exclude=exclude)
    return float(average_precision(ranked).mean())


def per_class_average_precision(distances, relevance, query_labels, k: int | None = None, db_ids=None,
                                descending: bool = False, exclude=None) -> dict[str, float]:
    """mAP@k of the queries of each class: ``{label: mean AP of the queries with that label}``, sorted by
    label (the fairness view: a mean over all queries can hide a class the codes fail)."""
    ranked, _ = _ranked_relevance(distances, relevance, db_ids, descending, k, allow_none=True, exclude=exclude)
    ap = average_precision(ranked)
    labels = np.asarray(query_labels)
    return {str(label): float(ap[labels == label].mean()) for label in sorted(set(labels.tolist()))}


def worst_class(per_class: dict[str, float]) -> dict:
    """The class with the lowest figure, its figure, the mean over classes and the gap between them."""
    label = min(per_class, key=lambda c: (per_class[c], c))
    mean = float(np.mean(list(per_class.values())))
    return {"class": label, "value": per_class[label], "mean": mean, "gap": mean - per_class[label]}


def precision_at_k(
    distances, relevance, k: int, db_ids=None, descending: bool = False, exclude=None
) -> float:
    """Mean over queries of (number of relevant items in the top k) / k.

    Ranking ties are broken by db id; a k larger than N is treated as N (larger than what a query
    may retrieve once ``exclude`` is applied: as that number).
    """
    ranked, kept = _ranked_relevance(distances, relevance, db_ids, descending, k, allow_none=False, exclude=exclude)
    if exclude is None:
        return float(ranked.mean(axis=1).mean())
    return float((ranked.sum(axis=1) / np.maximum(kept, 1)).mean())


def precision_recall_curve(query_codes, db_codes, relevance) -> dict:
    """Hashing precision-recall curve by Hamming radius.

    For each radius r in 0..bits the retrieved set of a query is every database
    item within Hamming distance r. Per query:
      precision_q(r) = relevant retrieved / retrieved,
      recall_q(r)    = relevant retrieved / all relevant.
    Both are averaged over queries, with these conventions: a query retrieving
    nothing at radius r is left out of the precision mean at r (precision is 0 at
    r if no query retrieves anything); a query with no relevant item at all is left
    out of the recall means (recall is 0 everywhere if no query has one).

    Returns dict(radius=arange(bits + 1), precision=float64 (bits+1,),
    recall=float64 (bits+1,)).
    """
    distances = hamming_distances(query_codes, db_codes)  # (Q, N)
    relevance = _check_relevance(relevance, distances.shape)
    n_queries = distances.shape[0]
    n_radii = to_bits(query_codes).shape[1] + 1
    if n_queries == 0:
        raise ValueError("precision_recall_curve needs at least one query")

    # Histogram each query's distances (all items / relevant items), then a
    # cumulative sum over radius gives the counts within radius r.
    flat = (np.arange(n_queries)[:, None] * n_radii + distances).ravel()  # (Q*N,)
    size = n_queries * n_radii
    retrieved = np.bincount(flat, minlength=size).reshape(n_queries, n_radii)
    relevant = np.bincount(flat, weights=relevance.ravel(), minlength=size)
    relevant = relevant.reshape(n_queries, n_radii)
    retrieved = np.cumsum(retrieved, axis=1).astype(np.float64)  # (Q, R)
    relevant_retrieved = np.cumsum(relevant, axis=1)  # (Q, R)
    total_relevant = relevance.sum(axis=1).astype(np.float64)  # (Q,)

    has_retrieved = retrieved > 0  # (Q, R)
    precision_q = np.divide(
        relevant_retrieved, retrieved, out=np.zeros_like(retrieved), where=has_retrieved
    )
    n_counted = has_retrieved.sum(axis=0)  # (R,)
    precision = np.divide(
        precision_q.sum(axis=0), n_counted, out=np.zeros(n_radii), where=n_counted > 0
    )

    has_relevant = total_relevant > 0  # (Q,)
    if has_relevant.any():
        recall = (relevant_retrieved[has_relevant] / total_relevant[has_relevant, None]).mean(axis=0)
    else:
        recall = np.zeros(n_radii)
    return dict(radius=np.arange(n_radii), precision=precision, recall=recall)


def recall_at_k(
    distances, ground_truth, ks: Iterable[int] = (1, 5, 10), db_ids=None, descending: bool = False
) -> dict:
    """Instance-retrieval R@k, in percent (0..100): {k: float}.

    ground_truth is bool (Q, N). R@k is the percentage of queries with at least one
    ground-truth item in their top k (ranking ties broken by db id). A query with
    no ground-truth item counts as a miss; a k larger than N is treated as N.
    """
    ks = list(ks)
    if not ks:
        raise ValueError("ks must name at least one k")
    distances = _as_matrix(distances, "distances")
    n_db = distances.shape[1]
    for k in ks:
        _check_k(k, n_db, allow_none=False)
    ground_truth = _check_relevance(ground_truth, distances.shape, name="ground_truth")
    if distances.shape[0] == 0:
        raise ValueError("recall_at_k needs at least one query")
    order = rank(distances, db_ids=db_ids, descending=descending)  # (Q, N)
    ranked = np.take_along_axis(ground_truth, order, axis=1)  # (Q, N)
    return {k: float(100.0 * ranked[:, :k].any(axis=1).mean()) for k in ks}


def mean_recall(r_t2i: Mapping, r_i2t: Mapping) -> float:
    """mR: the mean of R@1, R@5 and R@10 of both directions (six figures, percent)."""
    figures = []
    for name, recalls in (("r_t2i", r_t2i), ("r_i2t", r_i2t)):
        missing = [k for k in (1, 5, 10) if k not in recalls]
        if missing:
            raise ValueError(f"{name} lacks R@k for k in {missing}; mean_recall needs k = 1, 5, 10")
        figures.extend(float(recalls[k]) for k in (1, 5, 10))
    return float(np.mean(figures))


# --- input checks ---------------------------------------------------------------


def _is_int(value) -> bool:
    """True for Python / numpy integers, but not bools."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _check_k(k, n_db: int, allow_none: bool) -> int:
    """Validate k (>= 1, or None when allowed) and clip it to the database size."""
    if k is None:
        if allow_none:
            return n_db
        raise ValueError("k must be a positive integer, got None")
    if not _is_int(k) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return min(int(k), n_db)


def _as_matrix(values, name: str) -> np.ndarray:
    """values as a 2-D array, or a ValueError naming the argument."""
    arr = np.asarray(values)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (Q, N), got shape {arr.shape}")
    return arr


def _as_bool(values: np.ndarray, name: str) -> np.ndarray:
    """A bool or 0/1 array as bool; any other value is a ValueError."""
    if values.dtype == np.bool_:
        return values
    if not np.issubdtype(values.dtype, np.number) or not np.all((values == 0) | (values == 1)):
        raise ValueError(f"{name} must be bool or 0/1 values")
    return values.astype(bool)


def _check_relevance(relevance, shape: tuple, name: str = "relevance") -> np.ndarray:
    """relevance as bool (Q, N), checked against the distance matrix's shape."""
    relevance = _as_bool(_as_matrix(relevance, name), name)
    if relevance.shape != tuple(shape):
        raise ValueError(
            f"{name} has shape {relevance.shape} but distances have shape {tuple(shape)}"
        )
    return relevance


def _db_ids(db_ids, n_db: int) -> np.ndarray:
    """db_ids as a (N,) array, defaulting to arange(N)."""
    if db_ids is None:
        return np.arange(n_db, dtype=np.int64)
    ids = np.asarray(db_ids)
    if ids.shape != (n_db,):
        raise ValueError(f"db_ids must have shape ({n_db},) to match distances, got {ids.shape}")
    return ids


def _ranked_relevance(distances, relevance, db_ids, descending, k, allow_none, exclude=None):
    """Relevance in ranked order, cut to the top k: bool (Q, k), and how many of those k
    positions each query may fill: int (Q,) (k, or fewer where ``exclude`` leaves fewer items).

    Excluded items are moved to the end of their query's ranking (the others keep their order)
    and count as not relevant, so they change neither AP nor the hits in the top k.
    """
    distances = _as_matrix(distances, "distances")
    k = _check_k(k, distances.shape[1], allow_none=allow_none)
    relevance = _check_relevance(relevance, distances.shape)
    if distances.shape[0] == 0:
        raise ValueError("need at least one query")
    if k == 0:
        raise ValueError("the database is empty; nothing to rank")
    order = rank(distances, db_ids=db_ids, descending=descending)  # (Q, N)
    kept = np.full(distances.shape[0], k, dtype=np.int64)
    if exclude is not None:
        exclude = _check_relevance(exclude, distances.shape, name="exclude")
        relevance = relevance & ~exclude
        ranked_out = np.take_along_axis(exclude, order, axis=1)  # (Q, N) excluded, in ranked order
        order = np.take_along_axis(order, np.argsort(ranked_out, axis=1, kind="stable"), axis=1)
        kept = np.minimum(k, (~exclude).sum(axis=1))
    return np.take_along_axis(relevance, order[:, :k], axis=1), kept
