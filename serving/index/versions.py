"""Sharded faiss binary indexes over packed hash codes, stored as versions on an artifact root.

Ordering rule (STYLE.md, practice 7): every result list is ordered by (Hamming distance, row),
where the *row* is the item's global, stable int64 id:

* ``build_index`` sorts the ids (Python string order) and numbers them 0..N-1;
* ``add_to_index`` numbers the new ids, again in sorted order, from the base version's ``next_row``.

So a row never changes once assigned, rows are unique within an index version, and within each shard
they are stored in ascending order. A sharded search merged with ``merge_topk`` returns exactly what
one unsharded flat index over the same codes returns, ties included.

Items are placed on shards by ``stable_shard`` (sha256 of the id). Index files live under
``index/<collection>/vNNNN/`` (collection "images" for image codes, "captions" for caption codes,
whose items also carry the id of the image they describe); see ``build_index`` for the manifest.
The packed codes are the source of truth: the faiss index is rebuilt from them at load time.

Publishing rule: a writer claims its version number exclusively (``index/<collection>/vNNNN/
claim.json``, created only if absent; on a collision it takes the next number), writes and fsyncs
the shard files, then creates the manifest. A **release** (``index/releases/rNNNN.json``, see
``publish_release``) names the image and caption versions published together, with the sha256 of
each manifest, the model version and the code space; it is created last, exclusively, so a crash
at any point leaves the previous release the latest. Serving reads releases (``resolve_release``),
never the latest version of each collection on its own.
"""
from __future__ import annotations

import bisect
import functools
import hashlib
import io
import json
import logging
import os
import re
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone

import faiss
import numpy as np

from serving.index.items import META_FIELDS, ItemFilter, empty_columns, metadata_columns
from serving.model.codes import BIT_ORDER, SIGN_RULE, check_packed, n_bytes, validate_bits
from serving.storage import ArtifactRoot, open_root

log = logging.getLogger(__name__)

FORMAT = "terrahash-index/1"
MANIFEST_NAME = "manifest.json"
CLAIM_NAME = "claim.json"  # created first in a version folder: whoever creates it owns the number
INDEX_PREFIX = "index"
RELEASE_FORMAT = "terrahash-release/1"
RELEASES = "releases"  # index/releases/rNNNN.json; not a collection name
MAX_CLAIM_TRIES = 1000  # version numbers tried before giving up (each collision takes the next one)
MISSING_DISTANCE = int(np.iinfo(np.int32).max)  # padding when fewer than k results (faiss's own value)
MISSING_ROW = -1
SHARDING_RULE = "int.from_bytes(sha256(id.encode('utf-8'))[:8], 'big') % n_shards"
ROW_RULE = "rows 0..N-1 by sorted id at build; each add numbers its sorted new ids from next_row"
_COLLECTION = re.compile(r"[a-z][a-z0-9_-]{0,63}")
_VERSION = re.compile(r"v(\d{4,})")
_RELEASE = re.compile(r"r(\d{4,})")


class IndexVersionError(ValueError):
    """A request that an index version cannot satisfy: duplicate ids, a missing or unreadable version
    or release, bad input."""


class ReleaseConflictError(FileExistsError):
    """The release number asked for was published by another writer first."""


class ShardIntegrityError(RuntimeError):
    """A shard whose files do not match its manifest (checksum, presence, row count or shape)."""

    def __init__(self, shard: str, reason: str, file: str | None = None,
                 expected: str | None = None, actual: str | None = None):
        self.shard, self.reason, self.file = shard, reason, file
        self.expected, self.actual = expected, actual
        where = f" file {file}" if file else ""
        detail = f" (expected sha256 {expected}, actual {actual})" if expected or actual else ""
        super().__init__(f"shard {shard}{where}: {reason}{detail}; refusing to load it")


# --- sharding -------------------------------------------------------------------------------------


def stable_shard(image_id: str, n_shards: int) -> int:
    """The shard of ``image_id`` among ``n_shards``: the same on every machine and Python run."""
    n_shards = _check_n_shards(n_shards)
    digest = hashlib.sha256(str(image_id).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % n_shards


# --- index kinds: a registry keyed by the factory family, parsed by full-string regexes ----------


@dataclass(frozen=True)
class IndexKind:
    """One family of faiss binary index, named by its faiss factory string."""

    pattern: str  # full-match regex for the factory string; named groups are integer parameters
    exact: bool  # True when search is exhaustive, so results can be made tie-exact
    defaults: dict  # search-time parameters and their defaults
    tune: Callable  # tune(index, params, k): set the search-time parameters before a search
    check: Callable  # check(fields, bits): raise ValueError for parameters faiss would mishandle
    description: str


def _no_tuning(index, params, k):
    pass


def _tune_hnsw(index, params, k):
    index.hnsw.efSearch = max(int(params["ef_search"]), k)  # HNSW returns at most efSearch results


def _tune_ivf(index, params, k):
    index.nprobe = min(int(params["nprobe"]), index.nlist)


def _tune_hash(index, params, k):
    index.nflip = int(params["nflip"])


def _check_nothing(fields, bits):
    pass


def _check_hnsw(fields, bits):
    if not 2 <= fields["m"] <= 256:  # faiss crashes on M=1
        raise ValueError(f"BHNSW<M> needs 2 <= M <= 256, got M={fields['m']}")


def _check_ivf(fields, bits):
    if fields["nlist"] < 1:
        raise ValueError("BIVF<nlist> needs nlist >= 1")


def _check_hash(fields, bits):
    nhash, b = fields["nhash"], fields["b"]
    if nhash < 1 or not 1 <= b <= 64 or nhash * b > bits:
        raise ValueError(f"BHash<nhash>x<b> needs nhash >= 1, 1 <= b <= 64 and nhash * b <= {bits} bits, "
                         f"got {nhash}x{b}")


INDEX_KINDS: dict[str, IndexKind] = {
    "BFlat": IndexKind(r"BFlat", True, {}, _no_tuning, _check_nothing,
                       "IndexBinaryFlat: exhaustive, exact (the default)"),
    "BHNSW": IndexKind(r"BHNSW(?P<m>\d+)", False, {"ef_search": 64}, _tune_hnsw, _check_hnsw,
                       "IndexBinaryHNSW with M neighbours per node"),
    "BIVF": IndexKind(r"BIVF(?P<nlist>\d+)", False, {"nprobe": 16}, _tune_ivf, _check_ivf,
                      "IndexBinaryIVF with nlist lists, trained on the codes"),
    # faiss's own factory string for IndexBinaryMultiHash: nhash tables of b bits each.
    "BHash": IndexKind(r"BHash(?P<nhash>\d+)x(?P<b>\d+)", False, {"nflip": 2}, _tune_hash, _check_hash,
                       "IndexBinaryMultiHash: nhash hash tables of b bits, probing nflip bit flips"),
}


def parse_factory(factory: str, bits: int) -> tuple[IndexKind, dict]:
    """The IndexKind of ``factory`` and its integer parameters; ValueError for an unknown string."""
    bits = validate_bits(bits)
    for kind in INDEX_KINDS.values():
        match = re.fullmatch(kind.pattern, str(factory))
        if match:
            fields = {name: int(value) for name, value in match.groupdict().items()}
            kind.check(fields, bits)
            return kind, fields
    forms = ", ".join(kind.pattern.replace("(?P<", "<").replace(">\\d+)", ">") for kind in INDEX_KINDS.values())
    raise ValueError(f"unknown index factory {factory!r}; accepted forms: {forms}")


def build_faiss_index(codes_packed, bits: int, factory: str = "BFlat") -> faiss.IndexBinary:
    """A faiss binary index over ``codes_packed`` (uint8 (n, bits // 8)), trained first if it needs it."""
    _, fields = parse_factory(factory, bits)
    codes = check_packed(codes_packed, bits)
    index = faiss.index_binary_factory(bits, factory)
    if not index.is_trained:
        if len(codes) < fields.get("nlist", 1):
            raise ValueError(f"{factory} needs at least {fields.get('nlist')} codes to train, got {len(codes)}")
        index.train(codes)
    index.add(codes)
    return index


# --- searching ------------------------------------------------------------------------------------


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
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        k = int(k)
        if self.index is None or len(queries) == 0:
            return _pad(np.empty((len(queries), 0), np.int32), np.empty((len(queries), 0), np.int64), k)
        if where is not None:
            return _pad(*self._search_where(queries, k, where), k)
        if self.kind.exact:
            distances, rows = self._search_exact(queries, min(k, len(self)))
        else:
            distances, rows = self._search_approximate(queries, k)
        return _pad(distances, rows, k)

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
        out_d, out_r = _sorted_cut(distances, rows[positions], k)
        for q in np.flatnonzero(incomplete):
            # Ties run past the probe: collect every item within the k-th distance (radius is strict).
            lims, d, p = index.range_search(queries[q:q + 1], int(kth[q]) + 1, **restrict)
            d_q, r_q = _sorted_cut(d.astype(np.int32)[None], rows[p][None], k)
            out_d[q], out_r[q] = d_q[0], r_q[0]
        return out_d, out_r

    def _search_approximate(self, queries, k):
        with self._tune_lock:
            self.kind.tune(self.index, self.search_params, k)
            distances, positions = self.index.search(queries, k)  # (Q, k), -1 where faiss found nothing
        found = positions >= 0
        rows = np.where(found, self.rows[np.where(found, positions, 0)], MISSING_ROW)
        distances = np.where(found, distances, MISSING_DISTANCE).astype(np.int32)
        return _sorted_cut(distances, rows, k)


def _sorted_cut(distances, rows, k):
    """Sort every row of candidates by (distance, row) and keep the first k: (Q, <=k) each."""
    order = np.lexsort((rows, distances), axis=1)[:, :k]  # lexsort: the last key is the primary one
    return (np.take_along_axis(distances, order, axis=1).astype(np.int32),
            np.take_along_axis(rows, order, axis=1).astype(np.int64))


def _pad(distances, rows, k):
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
    return _pad(*_sorted_cut(distances, rows, k), k)


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


# --- index versions on an artifact root -----------------------------------------------------------


def build_index(codes_packed, ids: Sequence[str], bits: int, n_shards: int, root, factory: str = "BFlat", *,
                model_version: str, collection: str = "images", image_ids: Sequence[str] | None = None,
                texts: Sequence[str] | None = None, extra: dict | None = None, code_space: str | None = None,
                image_root: str | None = None, metadata: Sequence[dict] | None = None, cipher=None) -> dict:
    """Write a new index version of ``collection`` to ``root`` (a folder, ``s3://`` URI or ArtifactRoot).

    Rows are numbered by sorted id; items go to shards by ``stable_shard``. Files, under
    ``index/<collection>/vNNNN/``: per shard ``shard-XXXXX.codes.npy`` (uint8 (rows, bits // 8)) and
    ``shard-XXXXX.ids.npy`` (structured: row int64, id str[, image_id str][, text str], ascending
    rows; ``texts`` are what a caption index answers with, each item's own words), then
    ``manifest.json`` last, so a reader never sees a manifest naming files not yet written.
    Returns the manifest (format, collection, version, model_version, code_space, bits, bit order,
    factory, created UTC, n_shards, rows, next_row, image_roots, and per shard: name, rows, row_range,
    id_range, files with path (relative to ``index/<collection>/``), sha256 and bytes).

    ``code_space``: the id of the model's code space (serving.model.spec.code_space_id). ``image_root``:
    where the items' images are (the ids are paths relative to it); recorded for rows 0..N-1 in
    ``image_roots`` (see ImageRefs). ``metadata``: one dict per item (``bbox``, ``datetime``, other
    fields), stored as the ids file's metadata columns (serving.index.items) and searched by filters; the
    manifest then says ``has_metadata`` and counts the items with a footprint and a time (``filterable``).
    The version is not served until a release names it. ``cipher`` (serving.index.crypto.Cipher): the shard
    files are encrypted with it, and the manifest says so (``encryption``).
    """
    root, collection, bits = _open(root), _check_collection(collection), validate_bits(bits)
    codes = check_packed(codes_packed, bits)
    ids = _check_ids(ids, len(codes), "ids")
    image_ids = None if image_ids is None else _check_ids(image_ids, len(codes), "image_ids", unique=False)
    texts = None if texts is None else _check_texts(texts, len(codes))
    meta = _check_metadata(metadata, len(codes))
    order = np.argsort(ids, kind="stable")  # row r is the r-th smallest id
    table = _id_table(np.arange(len(ids), dtype=np.int64), ids[order],
                      None if image_ids is None else image_ids[order], None if texts is None else texts[order],
                      None if meta is None else {name: values[order] for name, values in meta.items()})
    codes = codes[order]
    n_shards = _check_n_shards(n_shards)
    shard_of = np.array([stable_shard(i, n_shards) for i in table["id"]], dtype=np.int64)
    _check_factory_fits(factory, bits, np.bincount(shard_of, minlength=n_shards))
    version = _claim_version(root, collection)
    entries = [_write_shard(root, collection, version, i, codes[shard_of == i], table[shard_of == i], cipher)
               for i in range(n_shards)]
    manifest = _manifest(collection, version, None, model_version, bits, factory, n_shards, entries,
                         next_row=len(ids), has_image_ids=image_ids is not None, extra=extra,
                         has_texts=texts is not None, code_space=code_space, has_metadata=meta is not None,
                         filterable=_filterable(meta), cipher=cipher,
                         image_roots=_with_root([], image_root, 0, len(ids)))
    return _write_manifest(root, manifest)


def add_to_index(root, base_version: str, new_codes_packed, new_ids: Sequence[str], *,
                 collection: str = "images", new_image_ids: Sequence[str] | None = None,
                 new_texts: Sequence[str] | None = None, model_version: str | None = None,
                 extra: dict | None = None, code_space: str | None = None, image_root: str | None = None,
                 new_metadata: Sequence[dict] | None = None, key_file=None) -> dict:
    """A new version = ``base_version`` plus new items; returns its manifest.

    Shards that receive no new id are reused: the new manifest points at their old files (same
    paths and sha256). Receiving shards get new files holding old and new items. An id already in
    the base version, or repeated among the new ids, is an IndexVersionError and nothing is written.
    ``model_version`` and ``code_space``, when given, must be the base's: codes of two models never
    share an index. ``image_root``: where the new items' images are (their ids are relative to it),
    recorded for the new rows in ``image_roots``; the base's rows keep theirs. ``new_metadata``: the new
    items' metadata, as for build_index (items on either side without any get empty columns). An
    encrypted base stays encrypted, with its key (serving.index.crypto.load_key: ``key_file`` or the environment).
    """
    from serving.index.crypto import cipher_for

    root, collection = _open(root), _check_collection(collection)
    base = read_manifest(root, base_version, collection)
    cipher = cipher_for(base, key_file)
    if model_version is not None and model_version != base["model_version"]:
        raise IndexVersionError(f"codes from model {model_version!r} cannot join {collection}/{base_version}, "
                                f"built with model {base['model_version']!r}; build a new index instead")
    if code_space is not None and base.get("code_space") not in (None, code_space):
        raise IndexVersionError(f"codes of code space {code_space} cannot join {collection}/{base_version}, "
                                f"built in code space {base['code_space']}; build a new index instead")
    bits, n_shards = base["bits"], base["n_shards"]
    codes = check_packed(new_codes_packed, bits)
    new_ids = _check_ids(new_ids, len(codes), "new_ids")
    if not len(new_ids):
        raise IndexVersionError("nothing to add: new_ids is empty")
    new_image_ids = _check_new_image_ids(base, new_image_ids, len(codes))
    if base.get("has_texts", False) != (new_texts is not None):
        need = "needs" if base.get("has_texts", False) else "takes no"
        raise IndexVersionError(f"{collection}/{base_version} {need} texts for its items")
    new_texts = None if new_texts is None else _check_texts(new_texts, len(codes))
    meta = _check_metadata(new_metadata, len(codes))
    if meta is None and base.get("has_metadata"):
        meta = empty_columns(len(codes))  # every receiving shard keeps its columns
    order = np.argsort(new_ids, kind="stable")
    rows = base["next_row"] + np.arange(len(new_ids), dtype=np.int64)
    table = _id_table(rows, new_ids[order], None if new_image_ids is None else new_image_ids[order],
                      None if new_texts is None else new_texts[order],
                      None if meta is None else {name: values[order] for name, values in meta.items()})
    codes = codes[order]
    shard_of = np.array([stable_shard(i, n_shards) for i in table["id"]], dtype=np.int64)
    # First read and check every receiving shard, so a duplicate id leaves nothing half written.
    merged = {}
    for i in np.unique(shard_of):
        entry = base["shards"][i]
        old_codes, old_table = _read_shard(root, collection, base, entry, key_file)
        _refuse_duplicates(entry["name"], old_table["id"], table["id"][shard_of == i])
        new = table[shard_of == i]
        merged[i] = (np.concatenate([old_codes, codes[shard_of == i]]),
                     _concat_tables(old_table, new))
    _check_factory_fits(base["factory"], bits, [len(merged[i][0]) if i in merged else e["rows"]
                                                for i, e in enumerate(base["shards"])])
    version = _claim_version(root, collection)
    entries = [_write_shard(root, collection, version, i, *merged[i], cipher) if i in merged else dict(entry)
               for i, entry in enumerate(base["shards"])]
    manifest = _manifest(collection, version, base["version"], base["model_version"], bits, base["factory"],
                         n_shards, entries, next_row=int(rows[-1]) + 1,
                         has_image_ids=base["has_image_ids"], extra={**base.get("extra", {}), **(extra or {})},
                         has_texts=base.get("has_texts", False), code_space=base.get("code_space") or code_space,
                         has_metadata=bool(base.get("has_metadata")) or meta is not None,
                         filterable=_filterable(meta, base.get("filterable")), cipher=cipher,
                         image_roots=_with_root(_image_roots(base), image_root, int(rows[0]), len(rows)))
    return _write_manifest(root, manifest)


@dataclass
class VerifyReport:
    """What verify_index found: ``ok`` and one ShardIntegrityError per problem."""

    collection: str
    version: str
    shards_checked: int = 0
    problems: list[ShardIntegrityError] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def bad_shards(self) -> list[str]:
        return sorted({problem.shard for problem in self.problems})

    def __str__(self) -> str:
        head = f"index {self.collection}/{self.version}: {self.shards_checked} shards checked, "
        if self.ok:
            return head + "all good"
        return head + f"{len(self.problems)} problems\n" + "\n".join(f"  {p}" for p in self.problems)


def verify_index(root, version: str, collection: str = "images", key_file=None) -> VerifyReport:
    """Check every shard of a version: files present, sha256 as in the manifest, rows and shapes (for an
    encrypted one, that its files decrypt with the key: serving.index.crypto.load_key)."""
    root, collection = _open(root), _check_collection(collection)
    manifest = read_manifest(root, version, collection)
    report = VerifyReport(collection, version)
    for entry in manifest["shards"]:
        report.shards_checked += 1
        report.problems.extend(_shard_problems(root, collection, manifest, entry, key_file)[0])
    total = sum(entry["rows"] for entry in manifest["shards"])
    if total != manifest["rows"]:
        report.problems.append(ShardIntegrityError("*", f"shard rows add up to {total}, manifest says {manifest['rows']}"))
    return report


def load_shard(root, version: str, shard_name: str, collection: str = "images",
               search_params: dict | None = None, key_file=None) -> Shard:
    """Load one shard and rebuild its faiss index; ShardIntegrityError if it does not match the manifest."""
    root, collection = _open(root), _check_collection(collection)
    manifest = read_manifest(root, version, collection)
    by_name = {entry["name"]: entry for entry in manifest["shards"]}
    if shard_name not in by_name:
        raise IndexVersionError(f"{collection}/{version} has no shard {shard_name!r}; it has {sorted(by_name)}")
    codes, table = _read_shard(root, collection, manifest, by_name[shard_name], key_file)
    return Shard(codes, table["row"], manifest["bits"], manifest["factory"], ids=table["id"],
                 image_ids=table["image_id"] if manifest["has_image_ids"] else None,
                 name=shard_name, search_params=search_params,
                 texts=table["text"] if manifest.get("has_texts") else None,
                 meta=_meta(table))


def load_index(root, version: str | None = None, collection: str = "images",
               search_params: dict | None = None, key_file=None) -> ShardedIndex:
    """Every shard of ``version`` (default: ``default_version``), checked and ready to search."""
    root, collection = _open(root), _check_collection(collection)
    version = version or default_version(root, collection)
    manifest = read_manifest(root, version, collection)
    shards = [load_shard(root, version, entry["name"], collection, search_params, key_file)
              for entry in manifest["shards"]]
    return ShardedIndex(shards, manifest)


def list_versions(root, collection: str = "images") -> list[str]:
    """The versions of ``collection`` that have a manifest (complete ones), oldest first."""
    root, collection = _open(root), _check_collection(collection)
    found = set()
    for key in root.list(f"{INDEX_PREFIX}/{collection}/"):
        parts = key.split("/")
        if len(parts) == 4 and parts[3] == MANIFEST_NAME and _VERSION.fullmatch(parts[2]):
            found.add(parts[2])
    return sorted(found, key=lambda v: int(v[1:]))


def latest_version(root, collection: str = "images") -> str:
    """The newest complete version of ``collection``."""
    versions = list_versions(root, collection)
    if not versions:
        raise IndexVersionError(f"no index versions of {collection!r} under {_open(root).uri}")
    return versions[-1]


def default_version(root, collection: str = "images") -> str:
    """The version of ``collection`` the latest release names; with no release at all (an index
    written before releases existed), the latest complete version."""
    root = _open(root)
    if list_releases(root):
        name = latest_release(root)
        entry = read_release(root, name)["collections"].get(collection)
        if entry is None:
            raise IndexVersionError(f"{root.uri}: release {name} has no {collection!r} index")
        return entry["version"]
    return latest_version(root, collection)


def read_manifest(root, version: str, collection: str = "images") -> dict:
    """The manifest of ``collection``/``version``; IndexVersionError if there is none."""
    root, collection = _open(root), _check_collection(collection)
    if not _VERSION.fullmatch(str(version)):
        raise IndexVersionError(f"not an index version name: {version!r} (expected like 'v0001')")
    key = f"{INDEX_PREFIX}/{collection}/{version}/{MANIFEST_NAME}"
    manifest = _read_json(root, key, "index version")
    if manifest.get("format") != FORMAT:
        raise IndexVersionError(f"{root.uri}/{key}: format {manifest.get('format')!r}, this code reads {FORMAT}")
    return manifest


def _read_json(root: ArtifactRoot, key: str, what: str) -> dict:
    """A JSON object stored at ``key``; IndexVersionError naming the file if it is missing or unreadable."""
    try:
        blob = root.read_bytes(key)
    except FileNotFoundError as err:
        raise IndexVersionError(f"{root.uri}/{key}: no such {what}") from err
    try:
        data = json.loads(blob)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise IndexVersionError(f"{root.uri}/{key}: unreadable {what} file ({len(blob)} bytes: {err}); it was not "
                                f"completely written; publish or rebuild the index") from None
    if not isinstance(data, dict):
        raise IndexVersionError(f"{root.uri}/{key}: unreadable {what} file (a JSON {type(data).__name__}, "
                                f"not an object)")
    return data


# --- releases: the image and caption versions published together ---------------------------------


def publish_release(root, manifests: dict, *, base_release: str | None = None, release: str | None = None) -> dict:
    """Publish a release naming the index versions in ``manifests`` ({"images": manifest, "captions":
    manifest or None}); returns it.

    Written last, after the versions it names are complete: ``index/releases/rNNNN.json`` =
    {format, release, base_release, created, model_version, code_space, bits, collections:
    {name: {version, manifest_sha256, rows}}}, and ``model`` ({uri: "models:/NAME/VERSION", name,
    version}) when the image manifest records a registered model version (``extra.model``). Created exclusively (a local hard link of a fsynced
    file, or a conditional put on S3): with ``release`` given, exactly that name or
    ReleaseConflictError if another writer took it; otherwise the next free number.
    """
    root = _open(root)
    if not manifests.get("images"):
        raise IndexVersionError("a release needs an image index version")
    chosen = {name: m for name, m in manifests.items() if m is not None}
    model_versions = {m["model_version"] for m in chosen.values()}
    code_spaces = {m.get("code_space") for m in chosen.values()} - {None}
    if len(model_versions) > 1 or len(code_spaces) > 1:
        raise IndexVersionError(f"the versions {sorted((n, m['version']) for n, m in chosen.items())} come from "
                                f"different models ({sorted(model_versions)}, code spaces {sorted(code_spaces)}); "
                                f"one release serves one model")
    collections = {}
    for name, manifest in sorted(chosen.items()):
        key = _collection_key(_check_collection(name), f"{manifest['version']}/{MANIFEST_NAME}")
        stored = root.read_bytes(key)  # what serving will read, pinned by its checksum
        collections[name] = {"version": manifest["version"], "manifest_sha256": hashlib.sha256(stored).hexdigest(),
                             "rows": int(manifest["rows"])}
    images = chosen["images"]
    body = {"format": RELEASE_FORMAT, "base_release": base_release,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "model_version": images["model_version"], "code_space": images.get("code_space"),
            "bits": images["bits"], "bit_order": images.get("bit_order", BIT_ORDER), "collections": collections}
    if images.get("extra", {}).get("model"):  # the registered model version the codes came from
        body["model"] = dict(images["extra"]["model"])
    if release is not None:
        _check_release_name(release)
        names = [release]
    else:
        start = int(_next_release(root)[1:])
        names = (f"r{n:04d}" for n in range(start, start + MAX_CLAIM_TRIES))
    for name in names:
        data = {**body, "release": name}
        try:
            root.create_bytes(_release_key(name), json.dumps(data, indent=2, sort_keys=True).encode())
            return data
        except FileExistsError:
            if release is not None:
                raise ReleaseConflictError(f"{root.uri}/{_release_key(name)}: release {name} was published by "
                                           f"another writer") from None
    raise IndexVersionError(f"{root.uri}: no free release number after {MAX_CLAIM_TRIES} tries")


def list_releases(root) -> list[str]:
    """The published releases under ``root``, oldest first."""
    root = _open(root)
    found = []
    for key in root.list(f"{INDEX_PREFIX}/{RELEASES}/"):
        name = key.rsplit("/", 1)[-1]
        if key.count("/") == 2 and name.endswith(".json") and _RELEASE.fullmatch(name[:-5]):
            found.append(name[:-5])
    return sorted(found, key=lambda r: int(r[1:]))


def latest_release(root) -> str:
    """The newest release (the highest number)."""
    releases = list_releases(root)
    if not releases:
        raise IndexVersionError(f"no releases under {_open(root).uri}/{INDEX_PREFIX}/{RELEASES}/ (an index written "
                                f"before releases existed: rebuild it with `terrahash index build`, or publish one "
                                f"with `terrahash index release`)")
    return releases[-1]


def read_release(root, release: str) -> dict:
    """The release file ``release`` (e.g. "r0003"); IndexVersionError naming the file if it is missing,
    truncated or not a release."""
    root = _open(root)
    key = _release_key(_check_release_name(release))
    data = _read_json(root, key, "release")
    if data.get("format") != RELEASE_FORMAT or not isinstance(data.get("collections"), dict) \
            or "images" not in data["collections"]:
        raise IndexVersionError(f"{root.uri}/{key}: not a {RELEASE_FORMAT} file naming an image index version")
    return data


def resolve_release(root, release: str | None = None, *, image_version: str | None = None,
                    caption_version: str | None = None) -> dict:
    """What serving serves: {"release": name or None, "images": manifest, "captions": manifest}, the
    "captions" key absent when the release has no caption index.

    ``release`` defaults to the latest. Each manifest is checked against the sha256 the release
    recorded for it. ``image_version`` / ``caption_version`` (the serve settings of the same names)
    override the release's version of that collection; with no release under ``root`` at all, an
    ``image_version`` alone is enough (and captions are served only if ``caption_version`` names
    them). The versions served must come from one model (model_version and code space), else
    IndexVersionError. Truncated or missing files are IndexVersionErrors naming the file.
    """
    root = _open(root)
    chosen: dict[str, str] = {}
    record: dict = {"collections": {}}
    name = release
    if release is not None or image_version is None or list_releases(root):
        name = release or latest_release(root)
        record = read_release(root, name)
        chosen = {c: entry["version"] for c, entry in record["collections"].items()}
    chosen.update({c: v for c, v in (("images", image_version), ("captions", caption_version)) if v})
    result: dict = {"release": name}
    for collection in ("images", "captions"):
        if collection not in chosen:
            continue
        manifest = read_manifest(root, chosen[collection], collection)
        pinned = record["collections"].get(collection, {})
        if pinned.get("version") == chosen[collection]:
            key = _collection_key(collection, f"{chosen[collection]}/{MANIFEST_NAME}")
            actual = hashlib.sha256(root.read_bytes(key)).hexdigest()
            if actual != pinned["manifest_sha256"]:
                raise IndexVersionError(f"{root.uri}/{key}: sha256 {actual[:12]}... is not the "
                                        f"{pinned['manifest_sha256'][:12]}... release {name} published")
        result[collection] = manifest
    images, captions = result["images"], result.get("captions")
    if captions is not None and (captions["model_version"] != images["model_version"]
                                 or captions.get("code_space") != images.get("code_space")):
        raise IndexVersionError(f"caption index {captions['version']} was built with model "
                                f"{captions['model_version']!r} (code space {captions.get('code_space')}), image index "
                                f"{images['version']} with {images['model_version']!r} "
                                f"(code space {images.get('code_space')}); they cannot be served together")
    return result


MAX_REBASES = 8  # an add whose release number another writer took first is redone on the newer release


def add_release(root, additions: dict, *, base_release: str | None = None, model_version: str | None = None,
                code_space: str | None = None, image_root: str | None = None, extra: dict | None = None,
                key_file=None) -> dict:
    """Add items to the collections of a release and publish the release of the result; returns
    {"release": release, "images": manifest, "captions": manifest or None}.

    ``additions``: {collection: {"codes": packed (n, bits // 8), "ids": [...], "image_ids": [...],
    "texts": [...], "metadata": [...]}} ("image_ids" for captions; "texts" are stored when the base
    collection keeps texts; "metadata" as for build_index). Collections of the base not in ``additions`` are carried over unchanged; each added
    collection gets a new version (add_to_index, with ``image_root`` for the new rows). Without
    ``base_release`` the base is the latest release and the new one must directly follow it: when
    another writer published that number first, the add is redone on the newer release, so
    concurrent adds all end up in the latest release (an id both added is refused). With
    ``base_release`` the new release takes the next free number.
    """
    root = _open(root)
    base = resolve_release(root, base_release)
    for _ in range(MAX_REBASES):
        manifests = {c: base.get(c) for c in ("images", "captions")}
        for collection, items in sorted(additions.items()):
            if base.get(collection) is None:
                raise IndexVersionError(f"release {base['release']} has no {collection!r} index to add to")
            manifests[collection] = add_to_index(
                root, base[collection]["version"], items["codes"], items["ids"], collection=collection,
                new_image_ids=items.get("image_ids"),
                new_texts=items.get("texts") if base[collection].get("has_texts") else None,
                new_metadata=items.get("metadata"),
                model_version=model_version, code_space=code_space, image_root=image_root, extra=extra,
                key_file=key_file)
        following = None if base_release is not None else f"r{int(base['release'][1:]) + 1:04d}"
        try:
            return {"release": publish_release(root, manifests, base_release=base["release"], release=following),
                    **manifests}
        except ReleaseConflictError as err:
            log.info("%s; adding again to the newer release", err)
            base = resolve_release(root)
    raise IndexVersionError(f"{root.uri}: {MAX_REBASES} other writers published first; try again")


@dataclass
class ReleaseReport:
    """What verify_release found: one VerifyReport per collection, and problems of the release itself."""

    release: str
    collections: dict[str, VerifyReport] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and all(report.ok for report in self.collections.values())

    def __str__(self) -> str:
        versions = ", ".join(f"{c} {r.version}" for c, r in self.collections.items())
        lines = [f"release {self.release} ({versions}): {'all good' if self.ok else 'PROBLEMS'}"]
        lines += [f"  {p}" for p in self.problems] + [f"  {r}" for r in self.collections.values()]
        return "\n".join(lines)


def verify_release(root, release: str | None = None, collections: Sequence[str] | None = None,
                   key_file=None) -> ReleaseReport:
    """Check a release (default: the latest): its file, each manifest's sha256, every shard of every
    collection it names (or of those of ``collections`` it names). Unreadable files are reported, not raised."""
    root = _open(root)
    name = release or latest_release(root)
    report = ReleaseReport(name)
    try:
        record = read_release(root, name)
    except IndexVersionError as err:
        report.problems.append(str(err))
        return report
    for collection, entry in sorted(record["collections"].items()):
        if collections is not None and collection not in collections:
            continue
        key = _collection_key(collection, f"{entry['version']}/{MANIFEST_NAME}")
        try:
            actual = hashlib.sha256(root.read_bytes(key)).hexdigest()
            if actual != entry["manifest_sha256"]:
                report.problems.append(f"{root.uri}/{key}: sha256 {actual[:12]}... is not the release's "
                                       f"{entry['manifest_sha256'][:12]}...")
            report.collections[collection] = verify_index(root, entry["version"], collection, key_file)
        except (FileNotFoundError, IndexVersionError) as err:
            report.problems.append(f"{collection} {entry['version']}: {err}")
    return report


def _release_key(release: str) -> str:
    return f"{INDEX_PREFIX}/{RELEASES}/{release}.json"


def _check_release_name(release: str) -> str:
    if not isinstance(release, str) or not _RELEASE.fullmatch(release):
        raise IndexVersionError(f"not a release name: {release!r} (expected like 'r0001')")
    return release


def _next_release(root: ArtifactRoot) -> str:
    """One past the highest release present."""
    releases = list_releases(root)
    return f"r{int(releases[-1][1:]) + 1 if releases else 1:04d}"


# --- image references ----------------------------------------------------------------------------


class ImageRefs:
    """Where the image of an item is: ``<root>/<image id>``, the root being that of the build or add
    that wrote the item's row (a manifest's ``image_roots``: [{"root", "rows": [first, last]}], rows
    of its own collection). Manifests written before image_roots existed use ``extra.image_root`` for
    every row. ``base`` (a serve setting) replaces every root.

    ``refs(row, image_id)`` -> the reference; a caption's row resolves to the root of the images it
    was added with.
    """

    def __init__(self, manifest: dict, base: str | None = None):
        self.base = base
        spans = sorted(_image_roots(manifest), key=lambda span: span["rows"][0])
        self._starts = [span["rows"][0] for span in spans]
        self._spans = spans
        self._default = manifest.get("extra", {}).get("image_root", "") if not spans else ""

    def root(self, row: int) -> str:
        """The image root of ``row`` ("" when none was recorded: the id is the reference)."""
        if self.base is not None:
            return self.base
        i = bisect.bisect_right(self._starts, int(row)) - 1
        if i >= 0 and self._spans[i]["rows"][0] <= row <= self._spans[i]["rows"][1]:
            return self._spans[i]["root"]
        return self._default

    def __call__(self, row: int, image_id: str) -> str:
        root = self.root(row)
        return f"{root.rstrip('/')}/{image_id}" if root else image_id


def _image_roots(manifest: dict) -> list[dict]:
    """A manifest's image roots; for one written before they existed, its extra.image_root for every row."""
    if "image_roots" in manifest:
        return [dict(span) for span in manifest["image_roots"]]
    legacy = manifest.get("extra", {}).get("image_root")
    return [{"root": legacy, "rows": [0, int(manifest["next_row"]) - 1]}] if legacy and manifest["next_row"] else []


def _with_root(spans: list[dict], image_root: str | None, first_row: int, n: int) -> list[dict]:
    """``spans`` plus rows first_row..first_row+n-1 under ``image_root`` (merged with the last span when
    it continues it under the same root)."""
    if not image_root or not n:
        return spans
    last = first_row + n - 1
    if spans and spans[-1]["root"] == str(image_root) and spans[-1]["rows"][1] == first_row - 1:
        return [*spans[:-1], {"root": str(image_root), "rows": [spans[-1]["rows"][0], last]}]
    return [*spans, {"root": str(image_root), "rows": [first_row, last]}]


# --- helpers: files ---------------------------------------------------------------------------------


def _open(root) -> ArtifactRoot:
    return root if isinstance(root, ArtifactRoot) else open_root(root)


def _collection_key(collection: str, path: str) -> str:
    return f"{INDEX_PREFIX}/{collection}/{path}"


def _next_version(root: ArtifactRoot, collection: str) -> str:
    """One past the highest version folder present, complete or not (never reuse a half-written one)."""
    numbers = [0]
    for key in root.list(f"{INDEX_PREFIX}/{collection}/"):
        parts = key.split("/")
        match = _VERSION.fullmatch(parts[2]) if len(parts) > 3 else None
        if match:
            numbers.append(int(match.group(1)))
    return f"v{max(numbers) + 1:04d}"


def _claim_version(root: ArtifactRoot, collection: str) -> str:
    """A version number of ``collection`` that this writer alone owns: its claim file is created only if
    absent (exclusive create); when another writer has the number, the next one is tried."""
    number = int(_next_version(root, collection)[1:])
    claim = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                        "claimed": datetime.now(timezone.utc).isoformat(timespec="seconds")}).encode()
    for _ in range(MAX_CLAIM_TRIES):
        version = f"v{number:04d}"
        try:
            root.create_bytes(_collection_key(collection, f"{version}/{CLAIM_NAME}"), claim)
            return version
        except FileExistsError:
            number += 1
    raise IndexVersionError(f"{root.uri}: no free version of {collection!r} after {MAX_CLAIM_TRIES} tries")


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _write_file(root: ArtifactRoot, collection: str, path: str, data: bytes, cipher=None) -> dict:
    """Write one file (sealed with ``cipher``, serving.index.crypto, when the index is encrypted); its manifest
    entry, whose sha256 is of the bytes stored."""
    if cipher is not None:
        data = cipher.seal(data, path)
    root.write_bytes(_collection_key(collection, path), data)
    return {"path": path, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def _write_shard(root, collection, version, number, codes, table, cipher=None) -> dict:
    """Write one shard's two files; return its manifest entry."""
    name = f"shard-{number:05d}"
    files = {"codes": _write_file(root, collection, f"{version}/{name}.codes.npy", _npy_bytes(codes), cipher),
             "ids": _write_file(root, collection, f"{version}/{name}.ids.npy", _npy_bytes(table), cipher)}
    row_range = [int(table["row"][0]), int(table["row"][-1])] if len(table) else None
    names = table["id"].tolist()
    id_range = [min(names), max(names)] if names else None  # for people reading the manifest
    return {"name": name, "rows": int(len(codes)), "row_range": row_range, "id_range": id_range, "files": files}


def _manifest(collection, version, base_version, model_version, bits, factory, n_shards, entries, *,
              next_row, has_image_ids, extra, has_texts=False, code_space=None, image_roots=(),
              has_metadata=False, filterable=None, cipher=None) -> dict:
    if not model_version or not isinstance(model_version, str):
        raise IndexVersionError("model_version must name the model version the codes came from")
    encryption = {"encryption": cipher.describe()} if cipher is not None else {}
    return {**encryption,
        "format": FORMAT, "collection": collection, "version": version, "base_version": base_version,
        "model_version": model_version, "code_space": code_space, "image_roots": list(image_roots),
        "bits": bits, "bit_order": BIT_ORDER, "sign_rule": SIGN_RULE,
        "factory": factory, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "n_shards": n_shards, "sharding": SHARDING_RULE, "row_rule": ROW_RULE,
        "rows": sum(entry["rows"] for entry in entries), "next_row": int(next_row),
        "has_image_ids": has_image_ids, "has_texts": bool(has_texts), "has_metadata": bool(has_metadata),
        "filterable": filterable or {"bbox": 0, "datetime": 0}, "extra": dict(extra or {}),
        "shards": entries,
    }


def _write_manifest(root, manifest) -> dict:
    """Create the manifest (exclusively: the version was claimed), after every shard file is durable."""
    key = _collection_key(manifest["collection"], f"{manifest['version']}/{MANIFEST_NAME}")
    root.create_bytes(key, json.dumps(manifest, indent=2, sort_keys=True).encode())
    return manifest


def _read_shard(root, collection, manifest, entry, key_file=None):
    """(codes, id table) of a shard, or the first ShardIntegrityError found."""
    problems, arrays = _shard_problems(root, collection, manifest, entry, key_file)
    if problems:
        raise problems[0]
    return arrays


def _shard_problems(root, collection, manifest, entry, key_file=None):
    """([ShardIntegrityError, ...], (codes, table) or None): checksums first (of the stored bytes), then
    decryption of an encrypted index (its key: serving.index.crypto.load_key), then contents."""
    from serving.index.crypto import IndexKeyError, cipher_for

    name, problems, data = entry["name"], [], {}
    for role, info in sorted(entry["files"].items()):
        try:
            blob = root.read_bytes(_collection_key(collection, info["path"]))
        except (FileNotFoundError, OSError) as err:
            problems.append(ShardIntegrityError(name, f"missing ({err})", info["path"]))
            continue
        actual = hashlib.sha256(blob).hexdigest()
        if actual != info["sha256"]:
            problems.append(ShardIntegrityError(name, "checksum mismatch", info["path"], info["sha256"], actual))
            continue
        data[role] = blob
    if problems:
        return problems, None
    try:
        cipher = cipher_for(manifest, key_file)
        if cipher is not None:
            data = {role: cipher.open(blob, entry["files"][role]["path"]) for role, blob in data.items()}
    except IndexKeyError as err:
        return [ShardIntegrityError(name, str(err))], None
    try:
        codes = np.load(io.BytesIO(data["codes"]), allow_pickle=False)
        table = np.load(io.BytesIO(data["ids"]), allow_pickle=False)
    except ValueError as err:
        return [ShardIntegrityError(name, f"unreadable file ({err})")], None
    problems = _content_problems(name, entry, manifest, codes, table)
    return problems, (None if problems else (codes, table))


def _content_problems(name, entry, manifest, codes, table) -> list[ShardIntegrityError]:
    """Row counts, code width and row order against the manifest entry."""
    expected = entry["rows"]
    width = n_bytes(manifest["bits"])
    problems = []
    if codes.dtype != np.uint8 or codes.shape != (expected, width):
        problems.append(ShardIntegrityError(name, f"codes have shape {codes.shape} {codes.dtype}, manifest "
                                                  f"says {expected} rows of {width} uint8 bytes"))
    if table.shape != (expected,):
        problems.append(ShardIntegrityError(name, f"ids file has {table.shape} rows, manifest says {expected}"))
    elif expected and [int(table["row"][0]), int(table["row"][-1])] != entry["row_range"]:
        problems.append(ShardIntegrityError(name, f"rows span {table['row'][0]}..{table['row'][-1]}, "
                                                  f"manifest says {entry['row_range']}"))
    return problems


# --- helpers: input checks -----------------------------------------------------------------------


def _check_collection(collection: str) -> str:
    if not isinstance(collection, str) or not _COLLECTION.fullmatch(collection) or collection == RELEASES:
        raise ValueError(f"collection must be a short lowercase name like 'images' (not {RELEASES!r}), "
                         f"got {collection!r}")
    return collection


def _check_n_shards(n_shards) -> int:
    if isinstance(n_shards, bool) or not isinstance(n_shards, (int, np.integer)) or n_shards < 1:
        raise ValueError(f"n_shards must be a positive integer, got {n_shards!r}")
    return int(n_shards)


def _check_texts(texts, n: int) -> np.ndarray:
    """texts as a str array of length n (empty strings allowed: an item may have no words)."""
    values = list(texts)
    if len(values) != n or not all(isinstance(v, str) for v in values):
        raise IndexVersionError(f"texts must be {n} strings, one per code; got {len(values)}")
    return np.array(values, dtype=str) if values else np.empty(0, dtype="<U1")


def _check_metadata(metadata, n: int) -> dict | None:
    """The metadata columns (serving.index.items.metadata_columns) of one dict per item, None when not given."""
    if metadata is None:
        return None
    values = list(metadata)
    if len(values) != n or not all(isinstance(v, dict) for v in values):
        raise IndexVersionError(f"metadata must be {n} dicts, one per code; got {len(values)}")
    try:
        return metadata_columns(values)
    except ValueError as err:
        raise IndexVersionError(f"metadata: {err}") from None


def _filterable(meta: dict | None, base: dict | None = None) -> dict:
    """How many items have a footprint and a time (``base``'s counts plus those of ``meta``)."""
    counts = dict(base or {"bbox": 0, "datetime": 0})
    if meta is not None:
        counts["bbox"] += int(np.isfinite(meta["west"]).sum())
        counts["datetime"] += int(np.isfinite(meta["start"]).sum())
    return counts


def _check_ids(ids, n: int, name: str, unique: bool = True) -> np.ndarray:
    """ids as a str array of length n: non-empty strings, unique unless ``unique`` is False."""
    values = list(ids)
    if len(values) != n:
        raise IndexVersionError(f"{len(values)} {name} for {n} codes")
    if not all(isinstance(v, str) and v for v in values):
        raise IndexVersionError(f"{name} must be non-empty strings")
    array = np.array(values, dtype=str) if values else np.empty(0, dtype="<U1")
    if unique:
        uniq, counts = np.unique(array, return_counts=True)
        if (counts > 1).any():
            raise IndexVersionError(f"duplicate {name}: {uniq[counts > 1][:5].tolist()}")
    return array


def _check_new_image_ids(base: dict, new_image_ids, n: int):
    if base["has_image_ids"] != (new_image_ids is not None):
        need = "needs" if base["has_image_ids"] else "takes no"
        raise IndexVersionError(f"{base['collection']}/{base['version']} {need} image ids for its items")
    return None if new_image_ids is None else _check_ids(new_image_ids, n, "new_image_ids", unique=False)


def _id_table(rows, ids, image_ids=None, texts=None, meta=None) -> np.ndarray:
    """The structured array stored in a shard's ids file: row, id, and image_id, text and the metadata
    columns (serving.index.items.META_FIELDS) when given."""
    def text_field(name, values):
        return name, f"<U{max(1, max((len(v) for v in values), default=1))}"

    columns = {"id": ids, "image_id": image_ids, "text": texts}
    fields = [("row", "<i8")] + [text_field(name, values) for name, values in columns.items() if values is not None]
    if meta is not None:
        fields += [(name, "<f8") for name in META_FIELDS[:-1]] + [text_field("props", meta["props"])]
        columns.update(meta)
    table = np.zeros(len(rows), dtype=fields)
    table["row"] = rows
    for name, values in columns.items():
        if values is not None:
            table[name] = values
    return table


def _meta(table) -> dict | None:
    return {name: table[name] for name in META_FIELDS} if "props" in table.dtype.names else None


def _concat_tables(old, new) -> np.ndarray:
    """Old rows then new ones; rebuilt so the string fields widen to the longer of the two. When only
    one side has metadata columns, the other's items get empty ones."""
    def both(name):
        return np.concatenate([old[name], new[name]]) if name in old.dtype.names else None

    meta = None
    if _meta(old) is not None or _meta(new) is not None:
        sides = [_meta(t) if _meta(t) is not None else empty_columns(len(t)) for t in (old, new)]
        meta = {name: np.concatenate([sides[0][name], sides[1][name]]) for name in META_FIELDS}
    return _id_table(both("row"), both("id"), both("image_id"), both("text"), meta)


def _refuse_duplicates(shard: str, existing, incoming) -> None:
    clash = np.intersect1d(np.asarray(existing, dtype=str), np.asarray(incoming, dtype=str))
    if len(clash):
        raise IndexVersionError(f"ids already in the index (shard {shard}): {clash[:5].tolist()}")


def _check_factory_fits(factory: str, bits: int, shard_rows) -> None:
    """Refuse at build time what would fail at load time (an IVF with more lists than codes)."""
    _, fields = parse_factory(factory, bits)
    smallest = min((int(r) for r in shard_rows if r), default=0)
    if "nlist" in fields and smallest and smallest < fields["nlist"]:
        raise ValueError(f"{factory} needs at least {fields['nlist']} codes per shard to train; "
                         f"the smallest shard would hold {smallest}")
