"""Item metadata and filters (serving/index/items.py) and exact filtered search (serving/index/versions.py), against brute force."""
import math

import numpy as np
import pytest

from serving.model.codes import random_codes
from serving.index.releases import load_index
from serving.index.versions import add_to_index, build_index, read_manifest
from serving.index.items import FilterError, ItemFilter, describe, metadata_columns, parse_bbox, parse_datetime
from tests.serving.index.test_versions import reference_topk

pytestmark = pytest.mark.usefixtures("one_faiss_thread")

DAY = 86400.0
T0 = 1717200000.0  # 2024-06-01T00:00:00Z


def test_filters_parse_as_stac_api_reads_them():
    assert parse_bbox("-117.5,33,-116,34.5") == (-117.5, 33.0, -116.0, 34.5)
    assert parse_bbox([170, -10, -170, 10]) == (170.0, -10.0, -170.0, 10.0)  # across the antimeridian
    assert parse_bbox(None) is None and parse_datetime("") is None
    assert parse_datetime("2024-06-01T00:00:00Z") == (T0, T0)
    assert parse_datetime("2024-06-01T02:00:00+02:00") == (T0, T0)
    assert parse_datetime("2024-06-01") == (T0, T0 + DAY - 1e-6)  # a date: the whole UTC day
    assert parse_datetime("2024-06-01T00:00:00Z/..") == (T0, math.inf)
    assert parse_datetime("/2024-06-01") == (-math.inf, T0 + DAY - 1e-6)
    bad = {"bbox": [[1, 2, 3], [0, 10, 1, 5], [0, 0, 200, 1], "a,b,c,d", [0, 0, float("nan"), 1]],
           "datetime": ["2024-06-01T00:00:00", "yesterday", "../..", "2024-06-02/2024-06-01", 20240601]}
    for name, values in bad.items():
        for value in values:
            with pytest.raises(FilterError) as err:
                ItemFilter.parse(**{name: value})
            assert err.value.field == name


def test_the_mask_keeps_what_intersects_and_drops_what_has_no_metadata():
    metadata = [{"bbox": [0, 0, 1, 1], "datetime": "2024-06-01T00:00:00Z"},
                {"bbox": [179, 0, 180, 1], "start_datetime": "2024-05-01T00:00:00Z",
                 "end_datetime": "2024-05-31T00:00:00Z"},
                {"bbox": [1, 1, 2, 2]},  # touches the first at a corner; no time
                {}]
    columns = metadata_columns(metadata)
    n = len(metadata)

    def passing(**query):
        return np.flatnonzero(ItemFilter.parse(**query).mask(columns, n)).tolist()

    assert passing(bbox=[0.5, 0.5, 1, 1]) == [0, 2]  # edges count
    assert passing(bbox=[170, -5, -170, 5]) == [1]  # across the antimeridian
    assert passing(datetime="2024-05-15/2024-06-01") == [0, 1]
    assert passing(datetime="2024-05-31T12:00:00Z/..") == [0]
    assert passing(bbox=[-180, -90, 180, 90], datetime="2024-06-01") == [0]
    assert ItemFilter(bbox=(0, 0, 1, 1)).mask(None, 3).tolist() == [False] * 3  # an index without metadata
    assert describe(columns, 1) == {"bbox": [179.0, 0.0, 180.0, 1.0], "start_datetime": "2024-05-01T00:00:00Z",
                                    "end_datetime": "2024-05-31T00:00:00Z", "properties": {}}
    assert describe(columns, 3) == {"properties": {}}


def random_metadata(n, seed):
    """Items on a 10 x 10 degree patch over 60 days, a third of them without a footprint or a time."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        west, south = rng.uniform(0, 10, 2)
        meta = {"class": f"c{i % 5}"}
        if i % 3:
            meta["bbox"] = [west, south, west + 0.5, south + 0.5]
        if i % 4:
            meta["datetime"] = f"2024-06-{1 + i % 30:02d}T12:00:00Z"
        out.append(meta)
    return out


@pytest.mark.parametrize("factory", ["BFlat", "BHNSW8", "BIVF4"])
def test_filtered_search_is_the_exact_top_k_among_the_items_that_pass(tmp_path, factory):
    bits, n = 16, 600
    codes = random_codes(n, bits, seed=4, distinct=12)  # many ties: the cut must still be by (distance, row)
    ids = [f"scene/{i:04d}.tif" for i in range(n)]
    metadata = random_metadata(n, 5)
    manifest = build_index(codes, ids, bits, 3, tmp_path, factory, model_version="m@1", metadata=metadata)
    assert manifest["has_metadata"] and manifest["filterable"] == {"bbox": 400, "datetime": 450}
    index = load_index(tmp_path, manifest["version"])
    order = np.argsort(ids)  # row r is the r-th smallest id
    columns = metadata_columns([metadata[i] for i in order])
    queries = random_codes(5, bits, seed=6)
    filters = [ItemFilter.parse(bbox=[2, 2, 5, 6]), ItemFilter.parse(datetime="2024-06-03/2024-06-09"),
               ItemFilter.parse(bbox=[0, 0, 10, 10], datetime="2024-06-10T00:00:00Z/.."),
               ItemFilter.parse(bbox=[20, 20, 21, 21])]  # passes nothing
    for where in filters:
        passing = np.flatnonzero(where.mask(columns, n))
        for k in (1, 7, 50):
            distances, rows = index.search(queries, k, where)
            want_d, want_r = reference_topk(queries, codes[order][passing], passing, k)
            found = min(k, len(passing))
            np.testing.assert_array_equal(rows[:, :found], want_r)
            np.testing.assert_array_equal(distances[:, :found], want_d)
            assert (rows[:, found:] == -1).all()
    # An add keeps the columns: items without metadata join and never pass a place filter.
    added = add_to_index(tmp_path, manifest["version"], random_codes(20, bits, seed=7),
                         [f"new/{i}" for i in range(20)], new_metadata=[{}] * 10 + random_metadata(10, 8))
    assert added["filterable"]["bbox"] == 400 + 6
    grown = load_index(tmp_path, added["version"])
    where = ItemFilter.parse(bbox=[0, 0, 10, 10])
    passing = set(np.concatenate([shard.ids[shard.matching(where)] for shard in grown.shards]).tolist())
    assert len(passing) == 406 and not passing & {f"new/{i}" for i in range(10)}


def test_metadata_travels_through_the_manifest_and_bad_metadata_is_refused(tmp_path):
    from serving.index.files import IndexVersionError

    codes = random_codes(3, 16, seed=1)
    with pytest.raises(IndexVersionError, match="item 1"):
        build_index(codes, ["a", "b", "c"], 16, 1, tmp_path, model_version="m@1",
                    metadata=[{}, {"datetime": "June"}, {}])
    manifest = build_index(codes, ["a", "b", "c"], 16, 1, tmp_path, model_version="m@1",
                           metadata=[{"bbox": "1,2,3,4", "note": "x"}, {}, {"datetime": "2024-06-01"}])
    assert read_manifest(tmp_path, manifest["version"])["filterable"] == {"bbox": 1, "datetime": 1}
    shard = load_index(tmp_path, manifest["version"]).shards[0]
    assert describe(shard.meta, 0) == {"bbox": [1.0, 2.0, 3.0, 4.0], "properties": {"note": "x"}}
