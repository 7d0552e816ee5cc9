"""serving/index/versions.py: sharding, tie-exact search and merge, index kinds, stored versions."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest

from serving.model.codes import BitLengthError, hamming_matrix, random_codes
from serving.index.files import IndexVersionError, ShardIntegrityError
from serving.index.kinds import build_faiss_index, parse_factory
from serving.index.releases import load_index
from serving.index.shards import MISSING_DISTANCE, MISSING_ROW, Shard, ShardedIndex, merge_topk, stable_shard
from serving.index.versions import add_to_index, build_index, list_versions, load_shard, read_manifest, verify_index

REPO = Path(__file__).resolve().parents[3]


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


def reference_topk(queries, db, rows, k):
    """Brute force: every distance, sorted by (distance, row), cut at k."""
    distances = hamming_matrix(queries, db)  # (Q, N)
    order = np.lexsort((np.broadcast_to(rows, distances.shape), distances), axis=1)[:, :k]
    return np.take_along_axis(distances, order, axis=1), np.asarray(rows)[order]


def sharded(codes, ids, bits, n_shards, factory="BFlat"):
    """In-memory shards cut the way build_index cuts them (rows by sorted id, stable_shard)."""
    order = np.argsort(ids)
    codes, ids, rows = codes[order], np.asarray(ids)[order], np.arange(len(ids))
    shard_of = np.array([stable_shard(i, n_shards) for i in ids])
    shards = [Shard(codes[shard_of == s], rows[shard_of == s], bits, factory, ids=ids[shard_of == s], name=f"s{s}")
              for s in range(n_shards)]
    return ShardedIndex(shards), codes, rows


# --- sharding ---------------------------------------------------------------------------------------


def test_stable_shard_is_pinned_and_uses_sha256():
    assert [stable_shard(s, 7) for s in ["a", "img0001", "airport_12.tif", "ü"]] == [4, 1, 2, 2]
    digest = hashlib.sha256("img0001".encode()).digest()
    assert stable_shard("img0001", 1000) == int.from_bytes(digest[:8], "big") % 1000


def test_stable_shard_is_the_same_in_another_process():
    code = "from serving.index.versions import stable_shard; print([stable_shard(f'id{i}', 5) for i in range(20)])"
    runs = [subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": seed, "PATH": ""}).stdout for seed in ("1", "2")]
    assert runs[0] == runs[1] == str([stable_shard(f"id{i}", 5) for i in range(20)]) + "\n"


def test_stable_shard_spreads_ids():
    counts = np.bincount([stable_shard(f"img{i}", 4) for i in range(4000)], minlength=4)
    assert counts.min() > 850
    with pytest.raises(ValueError):
        stable_shard("a", 0)


# --- tie exactness ----------------------------------------------------------------------------------


@pytest.mark.parametrize("distinct", [3, 40, None])
@pytest.mark.parametrize("n_shards", [1, 3, 8])
def test_sharded_topk_equals_unsharded_reference_with_ties(distinct, n_shards):
    bits = 16  # short codes: even "random" ones tie heavily
    codes = random_codes(3000, bits, seed=7, distinct=distinct)
    ids = [f"img{i:05d}" for i in np.random.default_rng(1).permutation(3000)]
    index, sorted_codes, rows = sharded(codes, ids, bits, n_shards)
    queries = np.concatenate([random_codes(10, bits, seed=8), sorted_codes[:5]])
    for k in (1, 7, 10, 64, 500):
        expected = reference_topk(queries, sorted_codes, rows, k)
        got = index.search(queries, k)
        np.testing.assert_array_equal(got[0], expected[0], err_msg=f"distances, k={k}")
        np.testing.assert_array_equal(got[1], expected[1], err_msg=f"rows, k={k}")


def test_identical_codes_everywhere_keep_the_smallest_rows():
    codes = np.zeros((1000, 8), dtype=np.uint8)  # every code the same: everything ties
    shard = Shard(codes, np.arange(1000) * 3, 64)
    distances, rows = shard.search(codes[:2], 5)
    assert rows.tolist() == [[0, 3, 6, 9, 12]] * 2 and distances.max() == 0


class LastTiesFirst:
    """A flat index over the codes in reverse order: among tied items faiss now reports the largest
    positions. faiss documents no tie order, so the shard must be right whatever order it gets."""

    def __init__(self, codes, bits):
        self.n, self.inner = len(codes), faiss.IndexBinaryFlat(bits)
        self.inner.add(np.ascontiguousarray(codes[::-1]))

    def search(self, queries, k):
        distances, positions = self.inner.search(queries, k)
        return distances, self.n - 1 - positions

    def range_search(self, queries, radius):
        lims, distances, positions = self.inner.range_search(queries, radius)
        return lims, distances, self.n - 1 - positions


@pytest.mark.parametrize("distinct", [3, None])
def test_tie_completion_does_not_trust_faiss_tie_order(distinct):
    bits, n = 16, 5000
    codes, queries = random_codes(n, bits, seed=2, distinct=distinct), random_codes(6, bits, seed=3)
    index, sorted_codes, rows = sharded(codes, [f"i{i:05d}" for i in range(n)], bits, 3)
    for shard in index.shards:
        shard.index = LastTiesFirst(shard.codes, bits)
    naive = merge_topk([_sorted_cut_of(shard.index.search(queries, 10), shard.rows) for shard in index.shards], 10)
    expected = reference_topk(queries, sorted_codes, rows, 10)
    assert not np.array_equal(naive[1], expected[1])  # trusting faiss's cut would be wrong here
    for k in (1, 10, 100):
        expected = reference_topk(queries, sorted_codes, rows, k)
        np.testing.assert_array_equal(index.search(queries, k)[1], expected[1])
        np.testing.assert_array_equal(index.search(queries, k)[0], expected[0])


def _sorted_cut_of(result, rows):
    distances, positions = result
    return distances, rows[positions]


def test_merge_topk_pads_and_orders():
    a = (np.array([[1, 3, MISSING_DISTANCE]]), np.array([[9, 4, MISSING_ROW]]))
    b = (np.array([[1, 2]]), np.array([[5, 7]]))
    distances, rows = merge_topk([a, b], 6)
    assert rows.tolist() == [[5, 9, 7, 4, MISSING_ROW, MISSING_ROW]]
    assert distances.tolist() == [[1, 1, 2, 3, MISSING_DISTANCE, MISSING_DISTANCE]]


def test_small_and_empty_shards_pad():
    shard = Shard(random_codes(3, 64), [0, 1, 2], 64)
    distances, rows = shard.search(random_codes(2, 64, seed=1), 5)
    assert (rows[:, 3:] == MISSING_ROW).all() and (distances[:, 3:] == MISSING_DISTANCE).all()
    empty = Shard(np.zeros((0, 8), np.uint8), [], 64)
    assert (empty.search(random_codes(2, 64), 4)[1] == MISSING_ROW).all()


# --- index kinds ------------------------------------------------------------------------------------


KINDS = {"BFlat": faiss.IndexBinaryFlat, "BHNSW16": faiss.IndexBinaryHNSW, "BIVF8": faiss.IndexBinaryIVF,
         "BHash4x16": faiss.IndexBinaryMultiHash}


@pytest.mark.parametrize("factory", sorted(KINDS))
def test_each_factory_builds_and_finds_near_duplicates(factory):
    bits, rng = 64, np.random.default_rng(3)
    db = random_codes(2000, bits, seed=4)
    assert isinstance(build_faiss_index(db, bits, factory), KINDS[factory])
    # Easy case: queries are database codes with one bit flipped; the original is the nearest.
    targets = rng.choice(2000, 50, replace=False)
    queries = db[targets].copy()
    queries[np.arange(50), rng.integers(0, 8, 50)] ^= np.uint8(1) << rng.integers(0, 8, 50).astype(np.uint8)
    shard = Shard(db, np.arange(2000), bits, factory)
    distances, rows = shard.search(queries, 10)
    flat_d, _ = reference_topk(queries, db, np.arange(2000), 10)
    recall = np.mean(distances[:, :1] <= flat_d[:, :1])
    assert recall >= 0.9 and np.mean(rows[:, 0] == targets) >= 0.9
    found = rows >= 0
    assert np.all(np.diff(np.where(found, distances, MISSING_DISTANCE), axis=1) >= 0)  # ordered


@pytest.mark.parametrize("factory", ["BFoo", "bflat", "BFlat ", "BHNSW1", "BHash4x32", "BHash1x65", "BIVF0", "BIVF"])
def test_unknown_or_bad_factory_strings_are_refused(factory):
    with pytest.raises(ValueError):
        parse_factory(factory, 64)


def test_search_params_apply_only_to_their_kind():
    db = random_codes(100, 64)
    assert Shard(db, np.arange(100), 64, "BIVF4", search_params={"nprobe": 4}).search_params == {"nprobe": 4}
    with pytest.raises(ValueError, match="nprobe"):
        Shard(db, np.arange(100), 64, "BFlat", search_params={"nprobe": 4})


# --- stored versions --------------------------------------------------------------------------------


def ids_for(n, start=0):
    return [f"scene_{i:05d}" for i in range(start, start + n)]


@pytest.mark.parametrize("root_name", ["local_root", "s3_root"])
def test_build_verify_add_round_trip(root_name, request):
    root = request.getfixturevalue(root_name)
    bits, codes = 32, random_codes(400, 32, seed=11, distinct=50)
    manifest = build_index(codes, ids_for(400), bits, 4, root, "BFlat", model_version="m7", extra={"data": "t"})
    assert manifest["version"] == "v0001" and manifest["rows"] == 400 and manifest["model_version"] == "m7"
    assert read_manifest(root, "v0001") == json.loads(json.dumps(manifest))
    assert verify_index(root, "v0001").ok

    index = load_index(root, "v0001")
    expected = reference_topk(codes[:6], codes, np.arange(400), 20)  # ids sorted == input order here
    np.testing.assert_array_equal(index.search(codes[:6], 20)[1], expected[1])
    assert index.ids([0, 399, MISSING_ROW]).tolist() == ["scene_00000", "scene_00399", ""]

    new_codes = random_codes(3, bits, seed=12)
    v2 = add_to_index(root, "v0001", new_codes, ["zz_b", "zz_a", "zz_c"])
    assert v2["version"] == "v0002" and v2["base_version"] == "v0001" and v2["rows"] == 403
    touched = {stable_shard(i, 4) for i in ["zz_a", "zz_b", "zz_c"]}
    for old, new in zip(manifest["shards"], v2["shards"]):
        same = old["files"] == new["files"]
        assert same == (int(old["name"][-1]) not in touched), old["name"]
    assert verify_index(root, "v0002").ok and list_versions(root) == ["v0001", "v0002"]
    index2 = load_index(root)  # latest
    distances, rows = index2.search(new_codes, 1)
    assert distances[:, 0].tolist() == [0, 0, 0]
    assert index2.ids(rows[:, 0]).tolist() == ["zz_b", "zz_a", "zz_c"]
    assert sorted(rows[:, 0].tolist()) == [400, 401, 402] and index2.ids([400]).tolist() == ["zz_a"]


def test_duplicate_ids_are_refused_and_nothing_is_written(local_root):
    codes = random_codes(50, 64)
    with pytest.raises(IndexVersionError, match="duplicate"):
        build_index(codes, ["a"] * 50, 64, 2, local_root, model_version="m")
    build_index(codes, ids_for(50), 64, 2, local_root, model_version="m")
    with pytest.raises(IndexVersionError, match="already in the index.*scene_00003"):
        add_to_index(local_root, "v0001", random_codes(2, 64), ["new_one", "scene_00003"])
    with pytest.raises(IndexVersionError, match="duplicate"):
        add_to_index(local_root, "v0001", random_codes(2, 64), ["x", "x"])
    assert list_versions(local_root) == ["v0001"] and not local_root.list("index/images/v0002")


def test_empty_shards_and_model_version_guard(local_root):
    codes = random_codes(2, 64)
    manifest = build_index(codes, ["b", "a"], 64, 6, local_root, model_version="m1")
    assert [entry["rows"] for entry in manifest["shards"]] == np.bincount(
        [stable_shard("a", 6), stable_shard("b", 6)], minlength=6).tolist()
    assert sum(entry["rows"] == 0 for entry in manifest["shards"]) >= 4
    assert verify_index(local_root, "v0001").ok
    distances, rows = load_index(local_root).search(codes, 3)
    assert rows[:, 0].tolist() == [1, 0] and (rows[:, 2] == MISSING_ROW).all()
    with pytest.raises(IndexVersionError, match="model 'm2'"):
        add_to_index(local_root, "v0001", random_codes(1, 64), ["c"], model_version="m2")
    with pytest.raises(IndexVersionError, match="nothing to add"):
        add_to_index(local_root, "v0001", np.zeros((0, 8), np.uint8), [])
    assert add_to_index(local_root, "v0001", random_codes(1, 64), ["c"], model_version="m1")["next_row"] == 3


def test_captions_are_a_separate_collection_mapping_to_images(local_root):
    build_index(random_codes(20, 64), ids_for(20), 64, 2, local_root, model_version="m")
    caption_ids = [f"cap_{i:03d}" for i in range(40)]
    image_ids = [f"scene_{i // 2:05d}" for i in range(40)]
    codes = random_codes(40, 64, seed=5)
    build_index(codes, caption_ids, 64, 3, local_root, model_version="m", collection="captions", image_ids=image_ids)
    captions = load_index(local_root, collection="captions")
    _, rows = captions.search(codes[7:8], 1)
    assert captions.ids(rows[0]).tolist() == ["cap_007"] and captions.image_ids(rows[0]).tolist() == ["scene_00003"]
    assert list_versions(local_root, "images") == ["v0001"] == list_versions(local_root, "captions")
    with pytest.raises(IndexVersionError, match="needs image ids"):
        add_to_index(local_root, "v0001", random_codes(1, 64), ["cap_new"], collection="captions")
    v2 = add_to_index(local_root, "v0001", random_codes(1, 64), ["cap_new"], collection="captions",
                      new_image_ids=["scene_00019"])
    assert v2["rows"] == 41 and verify_index(local_root, "v0002", "captions").ok


def flip_a_byte(root, key):
    data = bytearray(root.read_bytes(key))
    data[-1] ^= 0xFF
    root.write_bytes(key, bytes(data))


@pytest.mark.parametrize("root_name", ["local_root", "s3_root"])
def test_corrupted_shard_is_refused_and_reported(root_name, request):
    root = request.getfixturevalue(root_name)
    manifest = build_index(random_codes(100, 64), ids_for(100), 64, 3, root, model_version="m")
    bad = manifest["shards"][1]
    flip_a_byte(root, f"index/images/{bad['files']['codes']['path']}")
    with pytest.raises(ShardIntegrityError, match="shard-00001.*checksum") as err:
        load_shard(root, "v0001", "shard-00001")
    assert err.value.expected == bad["files"]["codes"]["sha256"] and err.value.actual != err.value.expected
    assert str(err.value.expected) in str(err.value)
    load_shard(root, "v0001", "shard-00000")  # the others still load
    report = verify_index(root, "v0001")
    assert not report.ok and report.bad_shards == ["shard-00001"] and "checksum" in str(report)
    with pytest.raises(ShardIntegrityError):
        load_index(root, "v0001")


def test_row_count_mismatch_is_refused(local_root):
    build_index(random_codes(100, 64), ids_for(100), 64, 2, local_root, model_version="m")
    key = "index/images/v0001/manifest.json"
    manifest = json.loads(local_root.read_bytes(key))
    manifest["shards"][0]["rows"] += 1
    local_root.write_bytes(key, json.dumps(manifest).encode())
    with pytest.raises(ShardIntegrityError, match="shard-00000.*manifest says"):
        load_shard(local_root, "v0001", "shard-00000")
    assert verify_index(local_root, "v0001").bad_shards == ["*", "shard-00000"]


def test_missing_shard_file_is_reported(local_root):
    manifest = build_index(random_codes(30, 64), ids_for(30), 64, 2, local_root, model_version="m")
    (Path(local_root.root) / "index/images" / manifest["shards"][0]["files"]["ids"]["path"]).unlink()
    report = verify_index(local_root, "v0001")
    assert report.bad_shards == ["shard-00000"] and "missing" in str(report)


def test_wrong_bit_lengths_are_errors(local_root):
    with pytest.raises(BitLengthError):
        build_index(np.zeros((4, 2), np.uint8), ids_for(4), 12, 1, local_root, model_version="m")
    with pytest.raises(BitLengthError, match="expected 8 bytes"):
        build_index(random_codes(4, 32), ids_for(4), 64, 1, local_root, model_version="m")
    build_index(random_codes(4, 64), ids_for(4), 64, 1, local_root, model_version="m")
    with pytest.raises(BitLengthError):
        add_to_index(local_root, "v0001", random_codes(1, 128), ["x"])
    with pytest.raises(BitLengthError):
        load_index(local_root).search(random_codes(1, 32), 3)


def test_ivf_too_large_for_its_shards_is_refused_at_build(local_root):
    with pytest.raises(ValueError, match="BIVF64 needs at least 64 codes per shard"):
        build_index(random_codes(100, 64), ids_for(100), 64, 2, local_root, "BIVF64", model_version="m")


def test_serving_imports_no_training_libraries():
    code = ("import sys, serving.index.versions, serving.model.codes; "
            "print(sorted(m for m in ('torch', 'timm', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_texts_travel_with_their_items_through_build_and_add(local_root):
    codes = random_codes(30, 64, seed=5)
    ids = ids_for(30)[::-1]  # rows are numbered by sorted id, so the texts must be reordered with them
    texts = [f"words of {i}" for i in ids]
    manifest = build_index(codes, ids, 64, 3, local_root, model_version="m", image_ids=ids, texts=texts)
    assert manifest["has_texts"]
    with pytest.raises(IndexVersionError, match="needs texts"):
        add_to_index(local_root, "v0001", random_codes(1, 64), ["new"], new_image_ids=["new"])
    add_to_index(local_root, "v0001", random_codes(2, 64, seed=6), ["new_b", "new_a"], new_image_ids=["b", "a"],
                 new_texts=["text b", ""])
    for shard in load_index(local_root, "v0002").shards:
        expected = {**dict(zip(ids, texts)), "new_b": "text b", "new_a": ""}
        assert [expected[i] for i in shard.ids.tolist()] == shard.texts.tolist()
    assert load_index(local_root, "v0002").shards[0].texts is not None
    plain = build_index(codes, ids, 64, 3, local_root, model_version="m", collection="captions", image_ids=ids)
    assert not plain["has_texts"] and load_index(local_root, collection="captions").shards[0].texts is None
    with pytest.raises(IndexVersionError, match="takes no texts"):
        add_to_index(local_root, "v0001", random_codes(1, 64), ["x"], collection="captions", new_image_ids=["x"],
                     new_texts=["x"])
