"""Index versions: sharded faiss binary indexes over packed hash codes, stored as versions on an artifact root.

Ordering rule (STYLE.md, practice 7): every result list is ordered by (Hamming distance, row),
where the *row* is the item's global, stable int64 id:

* ``build_index`` sorts the ids (Python string order) and numbers them 0..N-1;
* ``add_to_index`` numbers the new ids, again in sorted order, from the base version's ``next_row``.

So a row never changes once assigned, rows are unique within an index version, and within each shard
they are stored in ascending order. A sharded search merged with ``merge_topk`` (serving.index.shards)
returns exactly what one unsharded flat index over the same codes returns, ties included.

Items are placed on shards by ``stable_shard`` (sha256 of the id). Index files live under
``index/<collection>/vNNNN/`` (collection "images" for image codes, "captions" for caption codes,
whose items also carry the id of the image they describe); see ``build_index`` for the manifest.
The packed codes are the source of truth: the faiss index is rebuilt from them at load time.

Publishing rule: a writer claims its version number exclusively (``index/<collection>/vNNNN/
claim.json``, created only if absent; on a collision it takes the next number), writes and fsyncs
the shard files, then creates the manifest. A **release** (``index/releases/rNNNN.json``, see
serving.index.releases.publish_release) names the image and caption versions published together, with the sha256 of
each manifest, the model version and the code space; it is created last, exclusively, so a crash
at any point leaves the previous release the latest. Serving reads releases (``resolve_release``),
never the latest version of each collection on its own.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from serving.index.files import (FORMAT, INDEX_PREFIX, MANIFEST_NAME, _VERSION, IndexVersionError, ShardIntegrityError,
                                 _check_collection, _check_ids, _check_metadata, _check_new_image_ids, _check_texts,
                                 _claim_version, _concat_tables, _filterable, _id_table, _manifest, _meta, _open,
                                 _read_json, _read_shard, _refuse_duplicates, _shard_problems, _write_manifest,
                                 _write_shard)
from serving.index.items import empty_columns
from serving.index.kinds import _check_factory_fits
from serving.index.refs import _image_roots, _with_root
from serving.index.shards import _check_n_shards, Shard, stable_shard
from serving.model.codes import check_packed, validate_bits


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
    manifest = _read_json(root, key, "index version")
    if manifest.get("format") != FORMAT:
        raise IndexVersionError(f"{root.uri}/{key}: format {manifest.get('format')!r}, this code reads {FORMAT}")
    return manifest
