"""Searching: one shard's codes behind a faiss index (``Shard``), the stable placement of items on shards
(``stable_shard``), and the tie-exact merge of per-shard answers (``merge_topk``).

Every result list is ordered by (Hamming distance, row): a sharded search merged with ``merge_topk``
returns exactly what one unsharded flat index over the same codes returns, ties included (the
ordering rule of serving/index/versions.py)."""
from __future__ import annotations

import functools
import hashlib
import threading
from collections.abc import Sequence

import faiss
import numpy as np

from serving.index.items import META_FIELDS, ItemFilter
from serving.index.kinds import build_faiss_index, parse_factory
from serving.index.topk import MISSING_DISTANCE, MISSING_ROW, merge_topk, pad, sorted_cut
from serving.model.codes import check_packed, validate_bits


SHARDING_RULE = "int.from_bytes(sha256(id.encode('utf-8'))[:8], 'big') % n_shards"


_SEARCH_THREADS = [1]
_THREAD_STATE = threading.local()


def set_search_threads(threads: int) -> None:
    """OpenMP threads per search in this process (1 by default: one query gains nothing from more, and
    idle OpenMP threads spin, stealing the cores other requests need)."""
    _SEARCH_THREADS[0] = max(1, int(threads))


def _own_threads() -> None:
    """faiss's thread count is a setting of the calling thread (searches run in pools): set it once per thread."""
    if getattr(_THREAD_STATE, "threads", None) != _SEARCH_THREADS[0]:
        faiss.omp_set_num_threads(_SEARCH_THREADS[0])
        _THREAD_STATE.threads = _SEARCH_THREADS[0]


def _check_n_shards(n_shards) -> int:
    if isinstance(n_shards, bool) or not isinstance(n_shards, (int, np.integer)) or n_shards < 1:
        raise ValueError(f"n_shards must be a positive integer, got {n_shards!r}")
    return int(n_shards)


def stable_shard(image_id: str, n_shards: int) -> int:
    """The shard of ``image_id`` among ``n_shards``: the same on every machine and Python run."""
    n_shards = _check_n_shards(n_shards)
    digest = hashlib.sha256(str(image_id).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % n_shards


class Shard:
    """One shard: packed codes, their global rows (ascending), optional string ids, a faiss index."""

    def __init__(self, codes_packed, rows, bits: int, factory: str = "BFlat", ids=None, image_ids=None,
                 name: str = "shard", search_params: dict | None = None, texts=None, meta=None):
        self.name, self.bits, self.factory = name, validate_bits(bits), factory
        self.kind, _ = parse_factory(factory, bits)
        self.codes = check_packed(codes_packed, bits)
        self.rows = np.asarray(rows, dtype=np.int64)
        if self.rows.shape != (len(self.codes),):
            raise ValueError(f"shard {name}: {len(self.rows)} rows for {len(self.codes)} codes")
        if len(self.rows) > 1 and not np.all(np.diff(self.rows) > 0):
            raise ValueError(f"shard {name}: rows must be strictly increasing")
        self.ids = None if ids is None else np.asarray(ids, dtype=str)
        self.image_ids = self.ids if image_ids is None else np.asarray(image_ids, dtype=str)
        self.texts = None if texts is None else np.asarray(texts, dtype=str)  # e.g. each caption's words
        self.meta = None if meta is None else {name: np.asarray(meta[name]) for name in META_FIELDS}  # serving.index.items
        unknown = set(search_params or {}) - set(self.kind.defaults)
        if unknown:
            raise ValueError(f"search parameters {sorted(unknown)} do not apply to {factory}; "
                             f"it takes {sorted(self.kind.defaults)}")
        self.search_params = {**self.kind.defaults, **(search_params or {})}
        self.index = build_faiss_index(self.codes, bits, factory) if len(self.codes) else None
        # Search-time parameters live on the faiss index and HNSW's depends on k: concurrent searches
        # (a shard replica answers in a thread pool) must not search with each other's settings.
        self._tune_lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.rows)

    def search(self, queries_packed, k: int, where: ItemFilter | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of every query: (distances int32 (Q, k), rows int64 (Q, k)), ordered by (distance, row).

        Missing places (fewer than k items) hold MISSING_DISTANCE and MISSING_ROW. For exact kinds
        (BFlat) the cut at k is exact: among items tied at the k-th distance the smallest rows are kept.
        ``where`` (serving.index.items.ItemFilter): the top-k among the items that pass it, exact for every
        kind (see ``_search_where``).
        """
        queries = check_packed(queries_packed, self.bits)
        _own_threads()
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        k = int(k)
        if self.index is None or len(queries) == 0:
            return pad(np.empty((len(queries), 0), np.int32), np.empty((len(queries), 0), np.int64), k)
        if where is not None:
            return pad(*self._search_where(queries, k, where), k)
        if self.kind.exact:
            distances, rows = self._search_exact(queries, min(k, len(self)))
        else:
            distances, rows = self._search_approximate(queries, k)
        return pad(distances, rows, k)

    def matching(self, where: ItemFilter) -> np.ndarray:
        """Positions (ascending) of the items that pass ``where``."""
        return np.flatnonzero(where.mask(self.meta, len(self)))

    @functools.cached_property
    def id_order(self) -> np.ndarray:
        """Positions of the items in id order (rows follow ids within a build, not across adds)."""
        return np.argsort(self.ids, kind="stable")

    def _search_where(self, queries, k, where):
        """Exact filtered search: the shard's own flat index restricted to the passing items by a faiss
        IDSelector (exact kinds), or a flat index over their codes (approximate kinds, whose own
        search would not be exact). Ties as always: (distance, row)."""
        mask = where.mask(self.meta, len(self))
        passing = np.flatnonzero(mask)
        if not len(passing):
            return np.empty((len(queries), 0), np.int32), np.empty((len(queries), 0), np.int64)
        k = min(k, len(passing))
        if not self.kind.exact:
            subset = build_faiss_index(self.codes[passing], self.bits)
            return self._search_exact(queries, k, subset, self.rows[passing])
        bitmap = np.packbits(mask, bitorder="little")
        selector = faiss.IDSelectorBitmap(len(self), faiss.swig_ptr(bitmap))
        params = faiss.SearchParameters(sel=selector)
        return self._search_exact(queries, k, params=params, size=len(passing))

    def positions(self, rows) -> np.ndarray:
        """Positions in this shard of global ``rows``: int64, -1 where a row is not here."""
        rows = np.asarray(rows, dtype=np.int64)
        if not len(self.rows):
            return np.full(rows.shape, -1, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.rows, rows), len(self.rows) - 1)  # self.rows is ascending
        return np.where(self.rows[pos] == rows, pos, -1)

    def _search_exact(self, queries, k, index=None, rows=None, params=None, size=None):
        """Exhaustive search, then tie completion: (Q, k) sorted by (distance, row). By default over the
        shard's own index; ``index`` and its ``rows`` (a subset's), or ``params`` (an IDSelector passing
        ``size`` items), restrict it."""
        index = self.index if index is None else index
        rows = self.rows if rows is None else rows
        size = len(rows) if size is None else size
        restrict = {} if params is None else {"params": params}
        # Ask faiss for more than k: when the probe's last distance exceeds the k-th, every item tied
        # at the k-th distance is already among the candidates. faiss documents no order among ties,
        # so which tied items its own cut at k keeps is not something to rely on.
        probe = min(size, 2 * k + 16)
        distances, positions = index.search(queries, probe, **restrict)  # (Q, probe)
        kth = distances[:, k - 1]
        incomplete = (distances[:, probe - 1] == kth) if probe < size else np.zeros(len(queries), bool)
        out_d, out_r = sorted_cut(distances, rows[positions], k)
        for q in np.flatnonzero(incomplete):
            # Ties run past the probe: collect every item within the k-th distance (radius is strict).
            lims, d, p = index.range_search(queries[q:q + 1], int(kth[q]) + 1, **restrict)
            d_q, r_q = sorted_cut(d.astype(np.int32)[None], rows[p][None], k)
            out_d[q], out_r[q] = d_q[0], r_q[0]
        return out_d, out_r

    def _search_approximate(self, queries, k):
        with self._tune_lock:
            self.kind.tune(self.index, self.search_params, k)
            distances, positions = self.index.search(queries, k)  # (Q, k), -1 where faiss found nothing
        found = positions >= 0
        rows = np.where(found, self.rows[np.where(found, positions, 0)], MISSING_ROW)
        distances = np.where(found, distances, MISSING_DISTANCE).astype(np.int32)
        return sorted_cut(distances, rows, k)


class ShardedIndex:
    """The shards of one index version, searched together (in process; Ray wraps this elsewhere)."""

    def __init__(self, shards: Sequence[Shard], manifest: dict | None = None):
        self.shards, self.manifest = list(shards), manifest

    def search(self, queries_packed, k: int, where: ItemFilter | None = None):
        """Scatter to every shard, merge: (distances int32 (Q, k), rows int64 (Q, k))."""
        return merge_topk([shard.search(queries_packed, k, where) for shard in self.shards], k)

    def ids(self, rows) -> np.ndarray:
        """The string ids of global ``rows`` ('' for MISSING_ROW or an unknown row)."""
        return self._lookup(rows, "ids")

    def image_ids(self, rows) -> np.ndarray:
        """The image ids of ``rows``: for captions the image each caption describes."""
        return self._lookup(rows, "image_ids")

    def _lookup(self, rows, attribute):
        rows = np.asarray(rows, dtype=np.int64)
        out = np.full(rows.shape, "", dtype=object)
        for shard in self.shards:
            values = getattr(shard, attribute)
            if values is None:
                raise ValueError(f"shard {shard.name} was built without string ids")
            pos = shard.positions(rows)
            out[pos >= 0] = values[pos[pos >= 0]]
        return out
