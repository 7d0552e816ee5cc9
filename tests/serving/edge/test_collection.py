"""The popcount top-k equals a full sort by (distance, row), ties and filters included, at every code width."""
from __future__ import annotations

import numpy as np
import pytest

from serving.edge.collection import Collection, Strings, add_strings, joined
from serving.edge.container import Container, npy_bytes, write_container
from serving.index.items import ItemFilter
from serving.model.codes import pack_signs


def _collection(tmp_path, codes: np.ndarray, rows: np.ndarray | None = None, west=None) -> Collection:
    n = len(codes)
    members = {"c/codes.npy": npy_bytes(codes)}
    entry = {"refs": {"extra": {"image_root": ""}}, "members": {"codes": "c/codes.npy"}}
    if rows is not None:
        members["c/rows.npy"], entry["members"]["rows"] = npy_bytes(rows), "c/rows.npy"
    fields = {"ids": [f"item-{i:05d}" for i in range(n)]}
    if west is not None:
        fields["props"] = ['{"class": "x"}'] * n
        for name in ("west", "south", "east", "north", "start", "end"):
            values = west if name in ("west", "east") else np.zeros(n) if name in ("south", "north") else np.full(n, np.nan)
            members[f"c/{name}.npy"], entry["members"][name] = npy_bytes(values.astype(np.float64)), f"c/{name}.npy"
    for field, values in fields.items():
        add_strings(members, entry["members"], "c/", field, values)
    path = tmp_path / f"c{codes.shape[1]}.thb"
    write_container(path, {}, members)
    return Collection(Container(path), "c", entry, codes.shape[1] * 8)


def _reference(codes, query, k, keep=None):
    bits = np.unpackbits(codes, axis=1) != np.unpackbits(query[None], axis=1)
    d = bits.sum(axis=1)
    positions = np.arange(len(codes)) if keep is None else np.flatnonzero(keep)
    order = positions[np.lexsort((positions, d[positions]))][:k]
    return d[order], order


@pytest.mark.parametrize("bits", [8, 16, 24, 64, 128])
def test_top_k_is_the_full_sort_cut_at_k(tmp_path, bits):
    rng = np.random.default_rng(bits)
    # few distinct codes: many items tie at every distance, so the cut falls inside a tie
    distinct = rng.integers(0, 256, (12, bits // 8), dtype=np.uint8)
    codes = distinct[rng.integers(0, len(distinct), 3000)]
    collection = _collection(tmp_path, codes)
    for trial in range(20):
        query = rng.integers(0, 256, bits // 8, dtype=np.uint8)
        k = int(rng.choice([1, 7, 10, 100, 2999, 5000]))
        distances, positions = collection.top_positions(query, k)
        expected_d, expected_p = _reference(codes, query, k)
        assert np.array_equal(positions, expected_p) and np.array_equal(distances, expected_d), (bits, trial, k)


def test_filtered_top_k_and_rows_after_adds(tmp_path):
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 4, (500, 8), dtype=np.uint8)  # 2 bits used per byte: heavy ties
    west = rng.uniform(-10, 10, 500)
    rows = np.sort(rng.choice(10_000, 500, replace=False))  # rows with gaps, as after adds
    collection = _collection(tmp_path, codes, rows, west)
    where = ItemFilter.parse(bbox=[0, -1, 5, 1])
    keep = (west >= 0) & (west <= 5)
    query = codes[3]
    distances, positions = collection.top_positions(query, 20, where)
    expected_d, expected_p = _reference(codes, query, 20, keep)
    assert np.array_equal(positions, expected_p) and np.array_equal(distances, expected_d)
    answer = collection.answer(query, 600, with_codes=True, where=where)  # fewer pass than asked: padded
    found = answer["rows"][0] >= 0
    assert found.sum() == keep.sum() and np.array_equal(answer["rows"][0][found][:20], rows[expected_p])
    assert answer["ids"][0][0] == f"item-{expected_p[0]:05d}" and answer["meta"][0][0]["properties"] == {"class": "x"}
    assert np.array_equal(answer["codes"][0][0], codes[expected_p[0]])
    nowhere = ItemFilter.parse(bbox=[100, -1, 105, 1])
    assert len(collection.top_positions(query, 5, nowhere)[1]) == 0


def test_distances_agree_with_packed_signs(tmp_path):
    rng = np.random.default_rng(2)
    floats = rng.normal(size=(200, 64)).astype(np.float32)
    codes = pack_signs(floats)
    collection = _collection(tmp_path, codes)
    query = rng.normal(size=64).astype(np.float32)
    expected = ((floats >= 0) != (query >= 0)).sum(axis=1)
    assert np.array_equal(collection.distances(pack_signs(query[None])[0]), expected)


def test_strings_decode_one_item_at_a_time():
    values = ["a", "", "ünïcode", "x" * 300]
    blob, offsets = joined([v.encode() for v in values])
    strings = Strings(blob, offsets)
    assert len(strings) == 4 and [strings[i] for i in range(4)] == values
