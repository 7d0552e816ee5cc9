"""A bundle answers as the service: the same exact top-k over the same codes, checked against a flat faiss
index of the release (int8 students) and against the running Serve app over HTTP (fp32, what it serves)."""
from __future__ import annotations

import json
import urllib.error
import urllib.request
import zipfile

import numpy as np
import pytest

from serving.edge.container import BundleError, Container, write_container
from serving.edge.searcher import EdgeSearcher
from serving.ingest.dataset import load_dataset
from serving.model.encoders import load_encoder
from serving.model.versions import find_spec

FREE_TEXT = ["flooded fields near a river", "a harbour full of small boats", "two jets beside a big hangar",
             "dense houses with red roofs", "a baseball field next to a parking lot", "empty desert with dunes",
             "a freeway interchange", "tennis courts surrounded by trees", "a golf course with ponds",
             "storage tanks by a road"]


def text_queries(ucm_many, n: int = 100) -> list[str]:
    """The free-text queries and the dataset's own captions: ``n`` in all."""
    captions = [c for r in load_dataset(ucm_many).records for c in r.captions[:1]]
    return (FREE_TEXT + captions)[:n]


def image_files(ucm_many, n: int = 100) -> list[bytes]:
    return [r.path.read_bytes() for r in load_dataset(ucm_many).records[:n]]


def _top(answer: dict) -> list[tuple]:
    return [(h["id"], h.get("row"), h["distance"], h["score"]) for h in answer["results"]]


def test_the_int8_bundle_is_the_exact_top_k_of_the_int8_students(bundles, reference, model_dir, ucm_many):
    searcher = EdgeSearcher(bundles["int8"])
    flat = reference["flat"]
    for kind, queries in (("text", text_queries(ucm_many)), ("image", image_files(ucm_many))):
        encoder = load_encoder(find_spec(model_dir, kind, "int8"))
        # one query at a time, as they come: dynamic int8 quantizes activations over the whole batch
        distances, rows = flat.search(np.concatenate([encoder.encode_packed([q]) for q in queries]), 10)
        for i, query in enumerate(queries):
            answer = searcher.search_text({"query": query}) if kind == "text" else searcher.search_image(query, {})
            expected = [(str(flat.ids[flat.positions(np.array([r]))[0]]), int(r), int(d), 1 - int(d) / flat.bits)
                        for d, r in zip(distances[i], rows[i])]
            assert _top(answer) == expected, (kind, i)


@pytest.fixture(scope="module")
def app_url(serve_app):
    return serve_app


def _post(url: str, data: bytes, content_type: str) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=data, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _same_results(edge: dict, served: dict) -> None:
    for mine, theirs in zip(edge["results"], served["results"], strict=True):
        assert mine == theirs
    for key in ("k", "rerank", "fusion", "release", "index_version"):
        assert edge[key] == served[key], key
    assert ("drift" in edge) == ("drift" in served) and edge.get("drift") == served.get("drift")


def test_the_fp32_bundle_answers_as_the_serve_app(bundles, app_url, ucm_many):
    """100 text and 100 image queries: every hit equal (id, row, distance, score, image, thumbnail,
    properties), ties included; re-ranked and fused answers too; the same errors for the same bad requests."""
    searcher = EdgeSearcher(bundles["fp32"])
    for i, query in enumerate(text_queries(ucm_many)):
        params = {"query": query, "k": 10}
        if i % 10 == 1:
            params["rerank"] = "asymmetric"
        if i % 10 == 2:
            params.update(rerank="fusion", fusion="max" if i % 20 == 2 else "average")
        status, served = _post(f"{app_url}/v1/search/text", json.dumps(params).encode(), "application/json")
        assert status == 200, served
        _same_results(searcher.search_text(params), served)
    for i, data in enumerate(image_files(ucm_many)):  # in the same order: the drift windows see the same codes
        query = "k=10" + ("&rerank=asymmetric" if i % 10 == 1 else "")
        status, served = _post(f"{app_url}/v1/search/image?{query}", data, "image/jpeg")
        assert status == 200, served
        params = dict(p.split("=") for p in query.split("&"))
        _same_results(searcher.search_image(data, params), served)
    from serving.edge.http import BODIES, check_body
    from serving.runtime.checks import ApiError

    for body in ({"query": "x", "k": 0}, {"query": "  "}, {"query": "x", "kk": 1}, {"query": "x", "bbox": [0, 0, 1, 1]},
                 {"query": "x", "datetime": "2024"}, {"query": "x", "rerank": "best"}, {"query": 3}, {"k": 3}):
        status, served = _post(f"{app_url}/v1/search/text", json.dumps(body).encode(), "application/json")
        with pytest.raises(ApiError) as refused:
            searcher.search_text(check_body(body, BODIES["/v1/search/text"]))
        assert (refused.value.status, refused.value.code) == (status, served["error"]["code"]), body


def _rewritten(source, path, change):
    """``source``'s members, ``change(name, data)`` applied, written as a new bundle with a correct manifest."""
    opened = Container(source)
    manifest = {k: v for k, v in opened.manifest.items() if k not in ("members", "format", "encryption")}
    members = {name: change(name, opened.read(name)) for name in opened.manifest["members"]}
    write_container(path, manifest, members)
    return path


def test_an_altered_or_foreign_bundle_is_refused(bundles, tmp_path):
    searcher = EdgeSearcher(bundles["int8"])
    model_member = searcher.manifest["encoders"]["text"]["model"]
    copy = tmp_path / "altered.thb"
    data = bytearray(bundles["int8"].read_bytes())
    with zipfile.ZipFile(bundles["int8"]) as archive:
        info = archive.getinfo(model_member)
    data[info.header_offset + 200 + len(model_member)] ^= 0xFF
    copy.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=f"member {model_member} does not match its sha256"):
        EdgeSearcher(copy)

    text_spec = searcher.manifest["encoders"]["text"]["spec"]

    def other_space(name, blob):
        if name != text_spec:
            return blob
        return json.dumps({**json.loads(blob), "code_space": "sha256:" + "0" * 64}).encode()

    with pytest.raises(BundleError, match="has code space sha256:0000"):
        EdgeSearcher(_rewritten(bundles["int8"], tmp_path / "foreign.thb", other_space))
    with pytest.raises(BundleError, match="holds codes of code space"):
        EdgeSearcher(bundles["int8"], code_space="sha256:" + "1" * 64)
    assert EdgeSearcher(bundles["int8"], code_space=searcher.manifest["code_space"]).bits == searcher.bits


def test_an_encrypted_bundle_answers_as_the_plain_one(built_index, bundles, tmp_path, monkeypatch, ucm_many):
    from serving.edge.build import write_bundle
    from serving.index.crypto import KEY_ENV, KEY_FILE_ENV, write_key_file

    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.delenv(KEY_FILE_ENV, raising=False)
    key = tmp_path / "key"
    write_key_file(key)
    sealed = tmp_path / "sealed.thb"
    write_bundle(str(built_index["root"]), sealed, encrypt=True, key_file=str(key),
                 cache_dir=str(bundles["folder"] / "models"))
    with pytest.raises(BundleError, match="is encrypted"):
        EdgeSearcher(sealed)
    plain, opened = EdgeSearcher(bundles["int8"]), EdgeSearcher(sealed, key_file=key)
    for query in text_queries(ucm_many, 20):
        assert _top(opened.search_text({"query": query, "rerank": "fusion"})) == \
            _top(plain.search_text({"query": query, "rerank": "fusion"}))


def test_thumbnails_are_found_by_image_id(bundles, ucm_many):
    searcher = EdgeSearcher(bundles["int8"])
    hit = searcher.search_text({"query": FREE_TEXT[0], "k": 1})["results"][0]
    jpeg = searcher.thumbnail(hit["image_id"])
    assert jpeg[:3] == b"\xff\xd8\xff" and hit["thumbnail"].endswith(f"{hit['image_id']}/thumbnail")
    assert searcher.thumbnail("no/such/image.jpg") is None
    assert EdgeSearcher(bundles["fp32"]).thumbnail(hit["image_id"]) is None  # written without thumbnails


def test_limits_match_the_services_defaults():
    import typing

    from serving.edge.searcher import Limits
    from serving.runtime import settings
    from serving.runtime.checks import FUSION_RULES, RERANK_MODES

    defaults = settings.RouterConfig().model_dump()
    assert {k: defaults[k] for k in Limits().as_config()} == Limits().as_config()
    fields = settings.RouterConfig.model_fields  # the modes the settings accept are the ones requests are checked by
    assert (typing.get_args(fields["rerank"].annotation), typing.get_args(fields["fusion"].annotation)) == \
        (RERANK_MODES, FUSION_RULES)


def test_a_release_after_adds_keeps_its_rows_and_which_items_have_metadata(model_dir, tmp_path):
    """Rows after an add are not in id order, and only the added items have footprints: the bundle's top-k is
    the index's (distance, then row), and only the added items' hits carry bbox and properties."""
    from serving.edge.build import write_bundle
    from serving.index.releases import load_index, publish_release
    from serving.index.versions import add_to_index, build_index
    from serving.model.spec import load_spec
    from serving.model.versions import model_code_space

    spec = find_spec(model_dir, "image")
    bits, space = load_spec(spec).bits, model_code_space(model_dir, spec)
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 2, (60, bits // 8), dtype=np.uint8)  # one bit per byte in use: many ties
    root = str(tmp_path / "index")
    first = build_index(codes[:56], [f"z/old-{i:02d}" for i in range(56)], bits, 8, root, model_version="m",
                        code_space=space)
    added = add_to_index(root, first["version"], codes[56:], [f"a/new-{i:02d}" for i in range(4)], code_space=space,
                         new_metadata=[{"bbox": [i, 0, i + 1, 1], "class": "new"} for i in range(4)])
    publish_release(root, {"images": added})
    write_bundle(root, tmp_path / "added.thb", model=str(model_dir), cache_dir=str(tmp_path / "models"))
    searcher = EdgeSearcher(tmp_path / "added.thb")
    index = load_index(root)
    # the service describes a hit when its shard holds metadata: an add rewrites the shards it adds to with
    # empty metadata for their old items, and reuses the others as they were, without
    described = {int(r): shard.meta is not None for shard in index.shards for r in shard.rows}
    assert len(set(described.values())) == 2  # both kinds are in this release
    for q in range(10):
        distances, rows = index.search(codes[q:q + 1], 30)
        answer = searcher.images.answer(codes[q], 30)
        assert answer["rows"][0].tolist() == rows[0].tolist() and answer["distances"][0].tolist() == distances[0].tolist()
        for row, meta, item in zip(answer["rows"][0], answer["meta"][0], answer["ids"][0]):
            assert (meta is not None) == described[int(row)], (row, item)
            if item.startswith("a/new-"):
                assert meta["properties"] == {"class": "new"} and "bbox" in meta
            elif meta is not None:
                assert meta == {"properties": {}}
    hits = searcher.search_text({"query": "fields", "k": 20, "bbox": [0, 0, 5, 1]})["results"]
    assert hits and all(h["id"].startswith("a/new-") and h["bbox"][0] <= 5 for h in hits)
