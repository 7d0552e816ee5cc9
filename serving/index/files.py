"""The files of an index version: exclusive version claims, shard and manifest writing (encrypted when a
key is given), reading them back, and the checks of what a build or an add is given and what a shard
holds. Used by serving.index.versions and serving.index.releases; not a public interface."""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import socket
from datetime import datetime, timezone

import numpy as np

from serving.index.items import META_FIELDS, empty_columns, metadata_columns
from serving.index.shards import SHARDING_RULE
from serving.model.codes import BIT_ORDER, SIGN_RULE, n_bytes
from serving.storage import ArtifactRoot, open_root


FORMAT = "terrahash-index/1"
MANIFEST_NAME = "manifest.json"
CLAIM_NAME = "claim.json"  # created first in a version folder: whoever creates it owns the number
INDEX_PREFIX = "index"
MAX_CLAIM_TRIES = 1000  # version numbers tried before giving up (each collision takes the next one)
ROW_RULE = "rows 0..N-1 by sorted id at build; each add numbers its sorted new ids from next_row"
_COLLECTION = re.compile(r"[a-z][a-z0-9_-]{0,63}")
_VERSION = re.compile(r"v(\d{4,})")
RELEASES = "releases"  # index/releases/rNNNN.json; not a collection name


class IndexVersionError(ValueError):
    """A request that an index version cannot satisfy: duplicate ids, a missing or unreadable version
    or release, bad input."""


class ShardIntegrityError(RuntimeError):
    """A shard whose files do not match its manifest (checksum, presence, row count or shape)."""

    def __init__(self, shard: str, reason: str, file: str | None = None,
                 expected: str | None = None, actual: str | None = None):
        self.shard, self.reason, self.file = shard, reason, file
        self.expected, self.actual = expected, actual
        where = f" file {file}" if file else ""
        detail = f" (expected sha256 {expected}, actual {actual})" if expected or actual else ""
        super().__init__(f"shard {shard}{where}: {reason}{detail}; refusing to load it")


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


def _check_collection(collection: str) -> str:
    if not isinstance(collection, str) or not _COLLECTION.fullmatch(collection) or collection == RELEASES:
        raise ValueError(f"collection must be a short lowercase name like 'images' (not {RELEASES!r}), "
                         f"got {collection!r}")
    return collection


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
