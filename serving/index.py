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
"""
from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone

import faiss
import numpy as np

from cluster.artifacts import ArtifactRoot, open_root
from serving.codes import BIT_ORDER, SIGN_RULE, check_packed, n_bytes, validate_bits

FORMAT = "terrahash-index/1"
MANIFEST_NAME = "manifest.json"
INDEX_PREFIX = "index"
MISSING_DISTANCE = int(np.iinfo(np.int32).max)  # padding when fewer than k results (faiss's own value)
MISSING_ROW = -1
SHARDING_RULE = "int.from_bytes(sha256(id.encode('utf-8'))[:8], 'big') % n_shards"
ROW_RULE = "rows 0..N-1 by sorted id at build; each add numbers its sorted new ids from next_row"
_COLLECTION = re.compile(r"[a-z][a-z0-9_-]{0,63}")
_VERSION = re.compile(r"v(\d{4,})")


class IndexVersionError(ValueError):
    """A request that an index version cannot satisfy: duplicate ids, a missing version, bad input."""


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
                 name: str = "shard", search_params: dict | None = None, texts=None):
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
        unknown = set(search_params or {}) - set(self.kind.defaults)
        if unknown:
            raise ValueError(f"search parameters {sorted(unknown)} do not apply to {factory}; "
                             f"it takes {sorted(self.kind.defaults)}")
        self.search_params = {**self.kind.defaults, **(search_params or {})}
        self.index = build_faiss_index(self.codes, bits, factory) if len(self.codes) else None

    def __len__(self) -> int:
        return len(self.rows)

    def search(self, queries_packed, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of every query: (distances int32 (Q, k), rows int64 (Q, k)), ordered by (distance, row).

        Missing places (fewer than k items) hold MISSING_DISTANCE and MISSING_ROW. For exact kinds
        (BFlat) the cut at k is exact: among items tied at the k-th distance the smallest rows are kept.
        """
        queries = check_packed(queries_packed, self.bits)
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        k = int(k)
        if self.index is None or len(queries) == 0:
            return _pad(np.empty((len(queries), 0), np.int32), np.empty((len(queries), 0), np.int64), k)
        if self.kind.exact:
            distances, rows = self._search_exact(queries, min(k, len(self)))
        else:
            distances, rows = self._search_approximate(queries, k)
        return _pad(distances, rows, k)

    def positions(self, rows) -> np.ndarray:
        """Positions in this shard of global ``rows``: int64, -1 where a row is not here."""
        rows = np.asarray(rows, dtype=np.int64)
        if not len(self.rows):
            return np.full(rows.shape, -1, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.rows, rows), len(self.rows) - 1)  # self.rows is ascending
        return np.where(self.rows[pos] == rows, pos, -1)

    def _search_exact(self, queries, k):
        """Exhaustive search, then tie completion: (Q, k) sorted by (distance, row)."""
        # Ask faiss for more than k: when the probe's last distance exceeds the k-th, every item tied
        # at the k-th distance is already among the candidates. faiss documents no order among ties,
        # so which tied items its own cut at k keeps is not something to rely on.
        probe = min(len(self), 2 * k + 16)
        distances, positions = self.index.search(queries, probe)  # (Q, probe)
        kth = distances[:, k - 1]
        incomplete = (distances[:, probe - 1] == kth) if probe < len(self) else np.zeros(len(queries), bool)
        out_d, out_r = _sorted_cut(distances, self.rows[positions], k)
        for q in np.flatnonzero(incomplete):
            # Ties run past the probe: collect every item within the k-th distance (radius is strict).
            lims, d, p = self.index.range_search(queries[q:q + 1], int(kth[q]) + 1)
            d_q, r_q = _sorted_cut(d.astype(np.int32)[None], self.rows[p][None], k)
            out_d[q], out_r[q] = d_q[0], r_q[0]
        return out_d, out_r

    def _search_approximate(self, queries, k):
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

    def search(self, queries_packed, k: int):
        """Scatter to every shard, merge: (distances int32 (Q, k), rows int64 (Q, k))."""
        return merge_topk([shard.search(queries_packed, k) for shard in self.shards], k)

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
                texts: Sequence[str] | None = None, extra: dict | None = None) -> dict:
    """Write a new index version of ``collection`` to ``root`` (a folder, ``s3://`` URI or ArtifactRoot).

    Rows are numbered by sorted id; items go to shards by ``stable_shard``. Files, under
    ``index/<collection>/vNNNN/``: per shard ``shard-XXXXX.codes.npy`` (uint8 (rows, bits // 8)) and
    ``shard-XXXXX.ids.npy`` (structured: row int64, id str[, image_id str][, text str], ascending
    rows; ``texts`` are what a caption index answers with, each item's own words), then
    ``manifest.json`` last, so a reader never sees a manifest naming files not yet written.
    Returns the manifest (format, collection, version, model_version, bits, bit order, factory,
    created UTC, n_shards, rows, next_row, and per shard: name, rows, row_range, id_range, files with
    path (relative to ``index/<collection>/``), sha256 and bytes).
    """
    root, collection, bits = _open(root), _check_collection(collection), validate_bits(bits)
    codes = check_packed(codes_packed, bits)
    ids = _check_ids(ids, len(codes), "ids")
    image_ids = None if image_ids is None else _check_ids(image_ids, len(codes), "image_ids", unique=False)
    texts = None if texts is None else _check_texts(texts, len(codes))
    order = np.argsort(ids, kind="stable")  # row r is the r-th smallest id
    table = _id_table(np.arange(len(ids), dtype=np.int64), ids[order],
                      None if image_ids is None else image_ids[order], None if texts is None else texts[order])
    codes = codes[order]
    n_shards = _check_n_shards(n_shards)
    shard_of = np.array([stable_shard(i, n_shards) for i in table["id"]], dtype=np.int64)
    _check_factory_fits(factory, bits, np.bincount(shard_of, minlength=n_shards))
    version = _next_version(root, collection)
    entries = [_write_shard(root, collection, version, i, codes[shard_of == i], table[shard_of == i])
               for i in range(n_shards)]
    manifest = _manifest(collection, version, None, model_version, bits, factory, n_shards, entries,
                         next_row=len(ids), has_image_ids=image_ids is not None, extra=extra,
                         has_texts=texts is not None)
    return _write_manifest(root, manifest)


def add_to_index(root, base_version: str, new_codes_packed, new_ids: Sequence[str], *,
                 collection: str = "images", new_image_ids: Sequence[str] | None = None,
                 new_texts: Sequence[str] | None = None, model_version: str | None = None,
                 extra: dict | None = None) -> dict:
    """A new version = ``base_version`` plus new items; returns its manifest.

    Shards that receive no new id are reused: the new manifest points at their old files (same
    paths and sha256). Receiving shards get new files holding old and new items. An id already in
    the base version, or repeated among the new ids, is an IndexVersionError and nothing is written.
    ``model_version``, when given, must be the base's: codes of two models never share an index.
    """
    root, collection = _open(root), _check_collection(collection)
    base = read_manifest(root, base_version, collection)
    if model_version is not None and model_version != base["model_version"]:
        raise IndexVersionError(f"codes from model {model_version!r} cannot join {collection}/{base_version}, "
                                f"built with model {base['model_version']!r}; build a new index instead")
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
    order = np.argsort(new_ids, kind="stable")
    rows = base["next_row"] + np.arange(len(new_ids), dtype=np.int64)
    table = _id_table(rows, new_ids[order], None if new_image_ids is None else new_image_ids[order],
                      None if new_texts is None else new_texts[order])
    codes = codes[order]
    shard_of = np.array([stable_shard(i, n_shards) for i in table["id"]], dtype=np.int64)
    # First read and check every receiving shard, so a duplicate id leaves nothing half written.
    merged = {}
    for i in np.unique(shard_of):
        entry = base["shards"][i]
        old_codes, old_table = _read_shard(root, collection, base, entry)
        _refuse_duplicates(entry["name"], old_table["id"], table["id"][shard_of == i])
        new = table[shard_of == i]
        merged[i] = (np.concatenate([old_codes, codes[shard_of == i]]),
                     _concat_tables(old_table, new))
    _check_factory_fits(base["factory"], bits, [len(merged[i][0]) if i in merged else e["rows"]
                                                for i, e in enumerate(base["shards"])])
    version = _next_version(root, collection)
    entries = [_write_shard(root, collection, version, i, *merged[i]) if i in merged else dict(entry)
               for i, entry in enumerate(base["shards"])]
    manifest = _manifest(collection, version, base["version"], base["model_version"], bits, base["factory"],
                         n_shards, entries, next_row=int(rows[-1]) + 1,
                         has_image_ids=base["has_image_ids"], extra={**base.get("extra", {}), **(extra or {})},
                         has_texts=base.get("has_texts", False))
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


def verify_index(root, version: str, collection: str = "images") -> VerifyReport:
    """Check every shard of a version: files present, sha256 as in the manifest, rows and shapes."""
    root, collection = _open(root), _check_collection(collection)
    manifest = read_manifest(root, version, collection)
    report = VerifyReport(collection, version)
    for entry in manifest["shards"]:
        report.shards_checked += 1
        report.problems.extend(_shard_problems(root, collection, manifest, entry)[0])
    total = sum(entry["rows"] for entry in manifest["shards"])
    if total != manifest["rows"]:
        report.problems.append(ShardIntegrityError("*", f"shard rows add up to {total}, manifest says {manifest['rows']}"))
    return report


def load_shard(root, version: str, shard_name: str, collection: str = "images",
               search_params: dict | None = None) -> Shard:
    """Load one shard and rebuild its faiss index; ShardIntegrityError if it does not match the manifest."""
    root, collection = _open(root), _check_collection(collection)
    manifest = read_manifest(root, version, collection)
    by_name = {entry["name"]: entry for entry in manifest["shards"]}
    if shard_name not in by_name:
        raise IndexVersionError(f"{collection}/{version} has no shard {shard_name!r}; it has {sorted(by_name)}")
    codes, table = _read_shard(root, collection, manifest, by_name[shard_name])
    return Shard(codes, table["row"], manifest["bits"], manifest["factory"], ids=table["id"],
                 image_ids=table["image_id"] if manifest["has_image_ids"] else None,
                 name=shard_name, search_params=search_params,
                 texts=table["text"] if manifest.get("has_texts") else None)


def load_index(root, version: str | None = None, collection: str = "images",
               search_params: dict | None = None) -> ShardedIndex:
    """Every shard of ``version`` (default: the latest), checked and ready to search."""
    root, collection = _open(root), _check_collection(collection)
    version = version or latest_version(root, collection)
    manifest = read_manifest(root, version, collection)
    shards = [load_shard(root, version, entry["name"], collection, search_params) for entry in manifest["shards"]]
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


def read_manifest(root, version: str, collection: str = "images") -> dict:
    """The manifest of ``collection``/``version``; IndexVersionError if there is none."""
    root, collection = _open(root), _check_collection(collection)
    if not _VERSION.fullmatch(str(version)):
        raise IndexVersionError(f"not an index version name: {version!r} (expected like 'v0001')")
    key = f"{INDEX_PREFIX}/{collection}/{version}/{MANIFEST_NAME}"
    try:
        manifest = json.loads(root.read_bytes(key))
    except FileNotFoundError as err:
        raise IndexVersionError(f"{root.uri}/{key}: no such index version") from err
    if manifest.get("format") != FORMAT:
        raise IndexVersionError(f"{root.uri}/{key}: format {manifest.get('format')!r}, this code reads {FORMAT}")
    return manifest


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


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _write_file(root: ArtifactRoot, collection: str, path: str, data: bytes) -> dict:
    root.write_bytes(_collection_key(collection, path), data)
    return {"path": path, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def _write_shard(root, collection, version, number, codes, table) -> dict:
    """Write one shard's two files; return its manifest entry."""
    name = f"shard-{number:05d}"
    files = {"codes": _write_file(root, collection, f"{version}/{name}.codes.npy", _npy_bytes(codes)),
             "ids": _write_file(root, collection, f"{version}/{name}.ids.npy", _npy_bytes(table))}
    row_range = [int(table["row"][0]), int(table["row"][-1])] if len(table) else None
    names = table["id"].tolist()
    id_range = [min(names), max(names)] if names else None  # for people reading the manifest
    return {"name": name, "rows": int(len(codes)), "row_range": row_range, "id_range": id_range, "files": files}


def _manifest(collection, version, base_version, model_version, bits, factory, n_shards, entries, *,
              next_row, has_image_ids, extra, has_texts=False) -> dict:
    if not model_version or not isinstance(model_version, str):
        raise IndexVersionError("model_version must name the model version the codes came from")
    return {
        "format": FORMAT, "collection": collection, "version": version, "base_version": base_version,
        "model_version": model_version, "bits": bits, "bit_order": BIT_ORDER, "sign_rule": SIGN_RULE,
        "factory": factory, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "n_shards": n_shards, "sharding": SHARDING_RULE, "row_rule": ROW_RULE,
        "rows": sum(entry["rows"] for entry in entries), "next_row": int(next_row),
        "has_image_ids": has_image_ids, "has_texts": bool(has_texts), "extra": dict(extra or {}), "shards": entries,
    }


def _write_manifest(root, manifest) -> dict:
    key = _collection_key(manifest["collection"], f"{manifest['version']}/{MANIFEST_NAME}")
    root.write_bytes(key, json.dumps(manifest, indent=2, sort_keys=True).encode())
    return manifest


def _read_shard(root, collection, manifest, entry):
    """(codes, id table) of a shard, or the first ShardIntegrityError found."""
    problems, arrays = _shard_problems(root, collection, manifest, entry)
    if problems:
        raise problems[0]
    return arrays


def _shard_problems(root, collection, manifest, entry):
    """([ShardIntegrityError, ...], (codes, table) or None): checksums first, then contents."""
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
    if not isinstance(collection, str) or not _COLLECTION.fullmatch(collection):
        raise ValueError(f"collection must be a short lowercase name like 'images', got {collection!r}")
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


def _id_table(rows, ids, image_ids=None, texts=None) -> np.ndarray:
    """The structured array stored in a shard's ids file: row, id, and image_id and text when given."""
    def text_field(name, values):
        return name, f"<U{max(1, max((len(v) for v in values), default=1))}"

    columns = {"id": ids, "image_id": image_ids, "text": texts}
    fields = [("row", "<i8")] + [text_field(name, values) for name, values in columns.items() if values is not None]
    table = np.zeros(len(rows), dtype=fields)
    table["row"] = rows
    for name, values in columns.items():
        if values is not None:
            table[name] = values
    return table


def _concat_tables(old, new) -> np.ndarray:
    """Old rows then new ones; rebuilt so the string fields widen to the longer of the two."""
    def both(name):
        return np.concatenate([old[name], new[name]]) if name in old.dtype.names else None
    return _id_table(both("row"), both("id"), both("image_id"), both("text"))


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
