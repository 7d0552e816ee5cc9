"""One collection of a bundle (images, or captions): its packed codes, rows, ids and metadata columns, and
the exact top-k of a query by Hamming distance.

Items lie in row order, so ``position`` order is row order and ties fall as the service cuts them
(distance, then row: serving.index.topk). Distances are XOR and popcount (``np.bitwise_count``) over the
codes viewed as the widest unsigned words their width allows; the top k are then found by counting
distances (they are small integers) rather than by sorting a million of them.

Strings (ids, image ids, caption texts, properties) are stored as one UTF-8 blob and the offsets of each
string: only the k answered are decoded.
"""
from __future__ import annotations

import threading

import numpy as np

from serving.index.items import BBOX_FIELDS, TIME_FIELDS, describe
from serving.index.refs import ImageRefs
from serving.index.topk import MISSING_DISTANCE, MISSING_ROW

from .container import npy_bytes

STRING_FIELDS = ("ids", "image_ids", "texts", "props")
NUMBER_FIELDS = (*BBOX_FIELDS, *TIME_FIELDS)


def joined(items: list[bytes]) -> tuple[bytes, np.ndarray]:
    """Byte strings joined into one blob, and the n + 1 offsets that cut it apart (uint32 while the blob is under
    4 GiB, else uint64): how a bundle stores strings and thumbnails."""
    ends = np.cumsum([len(item) for item in items], dtype=np.uint64)
    small = len(ends) == 0 or int(ends[-1]) < 2**32
    offsets = np.zeros(len(items) + 1, dtype=np.uint32 if small else np.uint64)
    offsets[1:] = ends
    return b"".join(items), offsets


def add_strings(members: dict, entry_members: dict, prefix: str, field: str, values) -> None:
    """A string column ``<prefix><field>.utf8`` and ``.offsets.npy`` into ``members`` (their bytes) and a collection
    entry's ``members`` (their names, as ``<field>.utf8`` and ``<field>.offsets.npy``)."""
    blob, offsets = joined([str(v).encode("utf-8") for v in values])
    for suffix, data in ((".utf8", blob), (".offsets.npy", npy_bytes(offsets))):
        members[prefix + field + suffix] = data
        entry_members[field + suffix] = prefix + field + suffix


def offsets_fit(offsets: np.ndarray, size: int, length: int) -> bool:
    """Whether ``offsets`` cut a ``length``-byte blob into ``size`` pieces: size + 1 unsigned offsets from 0 to
    ``length`` that never decrease."""
    return (offsets.shape == (size + 1,) and offsets.dtype.kind == "u" and int(offsets[0]) == 0
            and int(offsets[-1]) == length and not np.any(offsets[1:] < offsets[:-1]))


class Strings:
    """A stored string column: ``strings[i]`` decodes item i only."""

    def __init__(self, blob: bytes | np.ndarray, offsets: np.ndarray):
        self.blob, self.offsets = blob, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        return bytes(self.blob[start:end]).decode("utf-8", errors="replace")


class Collection:
    """A collection's arrays, as the bundle manifest's ``collections[name]`` entry lists them."""

    def __init__(self, container, name: str, entry: dict, bits: int):
        self.name, self.entry, self.bits = name, entry, bits
        members = entry["members"]
        self.codes = container.array(members["codes"])  # (N, bits // 8) uint8, rows ascending
        if self.codes.dtype != np.uint8 or self.codes.ndim != 2 or self.codes.shape[1] * 8 != bits:
            raise ValueError(f"{container.path}: {members['codes']} holds {self.codes.dtype} {self.codes.shape}, "
                             f"not {bits}-bit packed codes")
        self.size = len(self.codes)
        where = f"{container.path}: {name}"
        self.rows = container.array(members["rows"]) if "rows" in members else None  # None: row == position
        if self.rows is not None and (self.rows.shape != (self.size,) or self.rows.dtype.kind not in "iu"
                                      or (self.size > 1 and not np.all(self.rows[1:] > self.rows[:-1]))):
            raise ValueError(f"{where}: its rows are not {self.size} increasing integers")
        if "ids.utf8" not in members:
            raise ValueError(f"{where}: no ids")
        self.strings = {field: _strings(container, members, field, self.size, where)
                        for field in STRING_FIELDS if field + ".utf8" in members}
        self.columns = self.described = None
        if "props" in self.strings:
            self.columns = {field: container.array(members[field]) for field in NUMBER_FIELDS}
            for field, column in self.columns.items():
                if column.shape != (self.size,) or column.dtype != np.float64:
                    raise ValueError(f"{where}: its {field} column is not {self.size} float64 values")
            self.columns["props"] = _LazyStrings(self.strings["props"])
            if "described" in members:  # a release whose older items have no metadata (serving.index.versions)
                self.described = container.array(members["described"])
                if self.described.shape != (self.size,) or self.described.dtype != np.bool_:
                    raise ValueError(f"{where}: its described flags are not {self.size} booleans")
        self.refs = ImageRefs(entry["refs"])
        self._words = _as_words(self.codes)
        self._lock = threading.Lock()  # the scratch buffers below are shared by the HTTP server's threads
        self._xor = np.empty(self._words.shape, self._words.dtype)
        self._count = np.empty(self._words.shape, np.uint8)

    def row_of(self, position: int) -> int:
        return int(self.rows[position]) if self.rows is not None else int(position)

    def distances(self, packed: np.ndarray) -> np.ndarray:
        """Hamming distances (N,) uint16 of one packed query (bits // 8,) to every item."""
        query = _as_words(np.ascontiguousarray(packed, dtype=np.uint8).reshape(1, -1))
        with self._lock:
            np.bitwise_xor(self._words, query, out=self._xor)
            np.bitwise_count(self._xor, out=self._count)
            if self._count.shape[1] == 1:
                return self._count[:, 0].astype(np.uint16)
            return self._count.sum(axis=1, dtype=np.uint16)

    def top_positions(self, packed: np.ndarray, k: int, where=None) -> tuple[np.ndarray, np.ndarray]:
        """(distances, positions) of the exact top k by (distance, row), among the items passing ``where``
        (serving.index.items.ItemFilter) when given; fewer when fewer pass."""
        d = self.distances(packed)
        beyond = self.bits + 1  # larger than any distance: marks items the filter drops
        if where is not None:
            d[~where.mask(self.columns, self.size)] = beyond
        counts = np.bincount(d, minlength=beyond + 1)[:beyond]  # items at each distance 0..bits
        cumulative = np.cumsum(counts)
        k = min(k, int(cumulative[-1]) if len(cumulative) else 0)
        if k == 0:
            return np.empty(0, np.int32), np.empty(0, np.int64)
        threshold = int(np.searchsorted(cumulative, k))  # the k-th distance
        closer = np.flatnonzero(d < threshold)  # ascending positions: ties at the threshold kept in row order
        at = np.flatnonzero(d == threshold)[:k - len(closer)]
        positions = np.concatenate([closer, at])
        order = np.lexsort((positions, d[positions]))
        positions = positions[order]
        return d[positions].astype(np.int32), positions

    def answer(self, packed: np.ndarray, k: int, with_codes: bool = False, where=None) -> dict:
        """The top k in the shape a shard group answers (serving.runtime.replicas), for
        serving.runtime.ranking.merge_hits: distances, rows, ids, image ids (codes, texts, meta), each (1, k)."""
        distances, positions = self.top_positions(packed, k, where)
        ids = self.strings["ids"]
        image_ids = self.strings.get("image_ids", ids)
        out = {"distances": np.full((1, k), MISSING_DISTANCE, np.int32), "rows": np.full((1, k), MISSING_ROW, np.int64),
               "ids": np.full((1, k), "", object), "image_ids": np.full((1, k), "", object)}
        out["distances"][0, :len(positions)] = distances
        if "texts" in self.strings:
            out["texts"] = np.full((1, k), "", object)
        if self.columns is not None:
            out["meta"] = np.full((1, k), None, object)
        if with_codes:
            out["codes"] = np.zeros((1, k, self.codes.shape[1]), np.uint8)
        for j, p in enumerate(positions.tolist()):
            out["rows"][0, j] = self.row_of(p)
            out["ids"][0, j], out["image_ids"][0, j] = ids[p], image_ids[p]
            if "texts" in out:
                out["texts"][0, j] = self.strings["texts"][p]
            if "meta" in out and (self.described is None or self.described[p]):
                out["meta"][0, j] = describe(self.columns, p)
            if with_codes:
                out["codes"][0, j] = self.codes[p]
        return out


def _strings(container, members: dict, field: str, size: int, where: str) -> Strings:
    """A stored string column, checked: ``size`` + 1 offsets from 0 that never decrease, ending at the blob's end."""
    blob = container.bytes_view(members[field + ".utf8"])
    offsets = container.array(members[field + ".offsets.npy"])
    if not offsets_fit(offsets, size, len(blob)):
        raise ValueError(f"{where}: its {field} offsets do not cut its {len(blob)}-byte blob into {size} strings")
    return Strings(blob, offsets)


class _LazyStrings:
    """A string column that ``serving.index.items.describe`` indexes like an array."""

    def __init__(self, strings: Strings):
        self.strings = strings

    def __getitem__(self, i) -> str:
        return self.strings[int(i)]


def _as_words(codes: np.ndarray) -> np.ndarray:
    """(N, B) uint8 codes viewed as (N, B / w) of the widest unsigned word w of 8, 4, 2 or 1 bytes dividing B."""
    width = codes.shape[1]
    for size, dtype in ((8, np.uint64), (4, np.uint32), (2, np.uint16)):
        if width % size == 0:
            return np.ascontiguousarray(codes).view(dtype)  # no copy of codes already contiguous (a mapped member)
    return codes
