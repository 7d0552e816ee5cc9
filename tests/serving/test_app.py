"""The Serve app over HTTP: sharded answers equal one unsharded index on real codes, endpoints, bad input,
readiness of a corrupted shard, hot reconfiguration, and a serving side that imports no torch."""
from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("ray.serve")

from serving.app import ServeSettings, _groups, shards_per_replica  # noqa: E402
from serving.runtime.ranking import asymmetric_rerank, fuse  # noqa: E402
from tests.serving.conftest import wait_http  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def call(url: str, body: bytes | None = None, content_type: str | None = None, method: str | None = None,
         headers: dict | None = None, context=None):
    """(status, JSON or text body) of one HTTP request."""
    request = urllib.request.Request(url, data=body, method=method or ("POST" if body is not None else "GET"),
                                     headers=headers or {})
    if content_type:
        request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as answer:
            status, raw, kind = answer.status, answer.read(), answer.headers.get("content-type", "")
    except urllib.error.HTTPError as err:
        status, raw, kind = err.code, err.read(), err.headers.get("content-type", "")
    return status, (json.loads(raw) if "json" in kind else raw.decode())


def post_json(url: str, payload, headers: dict | None = None, context=None) -> tuple[int, dict]:
    return call(url, json.dumps(payload).encode(), "application/json", headers=headers, context=context)


def multipart(fields: dict, image: bytes, filename: str = "q.jpg") -> tuple[bytes, str]:
    boundary = "terrahashboundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
                 f"Content-Type: image/jpeg\r\n\r\n".encode() + image + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def expected(reference, packed, k, drop=None) -> list[tuple[int, str]]:
    """(distance, id) of the unsharded top-k, ordered by (distance, row); ``drop`` leaves one id out."""
    distances, rows = reference["flat"].search(packed, k + (drop is not None))
    ids = reference["flat"].ids[rows[0]]
    pairs = [(int(d), str(i)) for d, i in zip(distances[0], ids) if i != drop]
    return pairs[:k]


def got(body) -> list[tuple[int, str]]:
    return [(hit["distance"], hit["id"]) for hit in body["results"]]


def test_sharded_answers_equal_one_unsharded_index_on_real_codes(serve_app, reference):
    items = reference["items"]
    captions = items.captions[::37][:8]
    for query in captions:  # text to image: 16-bit codes over 210 images tie heavily at k = 50
        status, body = post_json(f"{serve_app}/v1/search/text", {"query": query, "k": 50})
        assert status == 200, body
        assert got(body) == expected(reference, reference["text"].encode_packed([query]), 50)
    for path in items.image_paths[::53]:  # image to image, uploaded as multipart and as base64
        data = Path(path).read_bytes()
        want = expected(reference, reference["image"].encode_packed([path]), 30)
        status, body = call(f"{serve_app}/v1/search/image", *multipart({"k": 30}, data))
        assert status == 200 and got(body) == want
        status, body = post_json(f"{serve_app}/v1/search/image",
                                 {"image_base64": base64.b64encode(data).decode(), "k": 30})
        assert status == 200 and got(body) == want
    for image_id in items.image_ids[::71]:  # similar to an indexed image: itself left out
        status, body = call(f"{serve_app}/v1/search/similar/{image_id}?k=20")
        stored = reference["flat"].codes[reference["flat"].ids == image_id]
        assert status == 200 and got(body) == expected(reference, stored, 20, drop=image_id)


def test_results_carry_what_clients_need(serve_app, built_index):
    status, body = post_json(f"{serve_app}/v1/search/text", {"query": "a beach with white waves", "k": 5})
    assert status == 200
    assert body["model_version"] == built_index["images"]["model_version"]
    assert body["index_version"] == {"images": "v0001", "captions": "v0001"}
    assert body["latency_ms"] > 0 and {"encode", "search", "merge"} <= set(body["timings_ms"])
    hit = body["results"][0]
    assert {"id", "distance", "score", "image"} <= set(hit)
    # the image by its path under the archive root indexed: no server folder in an answer
    [root] = {span["root"] for span in built_index["images"]["image_roots"]}
    assert hit["image"] == hit["image_id"] and (Path(root) / hit["image"]).is_file()
    assert body["model"] == body["model_version"]  # a folder's model by its label, not its path
    assert hit["score"] == pytest.approx(1 - hit["distance"] / 16)


def test_no_answer_carries_a_server_folder(serve_app, built_index, model_dir, ucm_many):
    """Every endpoint's answer, with every option that names images, is free of the archive's, the index's
    and the model's folders on the server."""
    from serving.ingest.items import dataset_items

    items = dataset_items(ucm_many)
    image = Path(items.image_paths[0]).read_bytes()
    folders = {str(built_index["root"]), str(model_dir), str(ucm_many),
               *(span["root"] for span in built_index["images"]["image_roots"])}
    folders |= {str(Path(f).resolve()) for f in folders}
    first = items.image_ids[0]
    answers = [
        post_json(f"{serve_app}/v1/search/text", {"query": "a river", "k": 3}),
        post_json(f"{serve_app}/v1/search/text", {"query": "a river", "k": 3, "format": "stac"}),
        post_json(f"{serve_app}/v1/search/text", {"query": "a river", "k": 3, "rerank": "fusion"}),
        post_json(f"{serve_app}/v1/search/image", {"image_base64": base64.b64encode(image).decode(), "k": 3}),
        call(f"{serve_app}/v1/search/similar/{first}?k=3"),
        post_json(f"{serve_app}/v1/captions", {"image_id": first, "k": 3}),
        post_json(f"{serve_app}/v1/search/items", {"limit": 3}),
        post_json(f"{serve_app}/v1/search/items", {"limit": 3, "format": "stac"}),
        call(f"{serve_app}/v1/readyz"), call(f"{serve_app}/v1/traffic"), call(f"{serve_app}/v1/healthz"),
        call(f"{serve_app}/v1/models/default/card"), call(f"{serve_app}/v1/search/similar/nothing-here"),
    ]
    assert [status for status, _ in answers[:8]] == [200] * 8, answers
    for status, body in answers:
        text = json.dumps(body)
        assert not [f for f in folders if f in text], (status, text[:500])


def test_rerank_modes_and_captions(serve_app, reference):
    query = reference["items"].captions[5]
    for mode in ("asymmetric", "fusion"):
        for fusion in ("average", "max"):
            status, body = post_json(f"{serve_app}/v1/search/text",
                                     {"query": query, "k": 10, "rerank": mode, "fusion": fusion})
            assert status == 200 and len(body["results"]) == 10 and body["rerank"] == mode
            scores = [h["score"] for h in body["results"]]
            assert scores == sorted(scores, reverse=True)
    image_id = reference["items"].image_ids[3]
    status, body = post_json(f"{serve_app}/v1/captions", {"image_id": image_id, "k": 5})
    assert status == 200 and len(body["results"]) == 5 and all("#" in h["id"] for h in body["results"])
    caption_text = dict(zip(reference["items"].caption_ids, reference["items"].captions))
    assert [h["text"] for h in body["results"]] == [caption_text[h["id"]] for h in body["results"]]
    data = Path(reference["items"].image_paths[3]).read_bytes()
    status, upload = call(f"{serve_app}/v1/captions", *multipart({"k": 5}, data))
    assert status == 200 and got(upload) == got(body)  # the stored code is the upload's code


def test_shard_groups_follow_the_rule_the_router_relies_on():
    names = [f"shard-{i:05d}" for i in range(5)]
    for size in (1, 2, 3, 5):
        groups = _groups(names, size)
        assert sum(groups, []) == names
        assert all(names[i] in groups[i // size] for i in range(5))  # the router's shard -> group rule
    assert shards_per_replica(ServeSettings(index="x", shards_per_replica=3), 4) == 3
    assert shards_per_replica(ServeSettings(index="x", shards_per_replica=9), 4) == 4
    with pytest.raises(ValueError, match="shards_per_replica"):
        ServeSettings.from_dict({"index": "x", "shards_per_replica": -1})


def test_asymmetric_rerank_and_fusion_order():
    codes = np.packbits(np.array([[1] * 8, [0] * 8, [1] * 4 + [0] * 4], dtype=np.uint8), axis=1)
    hits = [{"row": r, "code": codes[r], "distance": 0} for r in range(3)]
    query = np.array([0.9] * 4 + [-0.1] * 4, dtype=np.float32)
    assert [h["row"] for h in asymmetric_rerank(query, hits, 8)] == [2, 0, 1]
    images = [{"image_id": "a", "score": 0.9, "distance": 1, "image": "/x/a"},
              {"image_id": "b", "score": 0.5, "distance": 4, "image": "/x/b"}]
    captions = [{"image_id": "b", "score": 1.0, "image": "/x/b"}, {"image_id": "c", "score": 0.8, "image": "/y/c"}]
    fused = fuse(images, captions, 8, "max")
    assert [h["id"] for h in fused] == ["b", "a", "c"]
    assert [h["image"] for h in fused] == ["/x/b", "/x/a", "/y/c"]  # a caption-only image keeps its own root
    assert [h["id"] for h in fuse(images, captions, 8, "average")] == ["a", "b", "c"]


def _png(width: int, height: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def bad_requests(image: bytes):
    """(name, method, path, body, content type, status, error code): each one a client error."""
    bomb = _png(2000, 1000)  # 2 M pixels, a few kB: over the test's 1 M pixel limit
    return [
        ("empty query", "/v1/search/text", json.dumps({"query": ""}).encode(), "application/json", 422, "empty_query"),
        ("whitespace", "/v1/search/text", json.dumps({"query": " \n\t "}).encode(), "application/json", 422,
         "empty_query"),
        ("too long", "/v1/search/text", json.dumps({"query": "x" * 201}).encode(), "application/json", 422,
         "query_too_long"),
        ("k zero", "/v1/search/text", json.dumps({"query": "a", "k": 0}).encode(), "application/json", 422,
         "k_out_of_range"),
        ("k large", "/v1/search/text", json.dumps({"query": "a", "k": 51}).encode(), "application/json", 422,
         "k_out_of_range"),
        ("k text", "/v1/search/text", json.dumps({"query": "a", "k": "many"}).encode(), "application/json", 422,
         "k_out_of_range"),
        ("bad json", "/v1/search/text", b"{not json", "application/json", 400, "invalid_json"),
        ("wrong type", "/v1/search/text", b"query=a", "application/x-www-form-urlencoded", 415,
         "unsupported_media_type"),
        ("not an image", "/v1/search/image", *multipart({}, b"this is not an image"), 422, "invalid_image"),
        ("truncated", "/v1/search/image", *multipart({}, image[: len(image) // 3]), 422, "invalid_image"),
        ("bomb", "/v1/search/image", *multipart({}, bomb), 413, "image_too_large"),
        ("too big", "/v1/search/image", *multipart({}, b"\xff" * 300_000), 413, "payload_too_large"),
        ("bad base64", "/v1/search/image", json.dumps({"image_base64": "@@@"}).encode(), "application/json", 422,
         "invalid_image"),
        ("wrong type image", "/v1/search/image", b"abc", "text/plain", 415, "unsupported_media_type"),
        ("unknown rerank", "/v1/search/text", json.dumps({"query": "a", "rerank": "magic"}).encode(),
         "application/json", 422, "invalid_rerank"),
        ("k superscript", "/v1/search/text", json.dumps({"query": "a", "k": "\u00b2"}).encode(), "application/json",
         422, "k_out_of_range"),
        ("k superscript form", "/v1/search/image", *multipart({"k": "\u00b2"}, image), 422, "k_out_of_range"),
        ("nested", "/v1/search/text", b'{"query": ' + b"[" * 2000 + b"]" * 2000 + b"}", "application/json", 400,
         "invalid_json"),
        ("unknown field", "/v1/search/text", json.dumps({"query": "a", "kk": 3}).encode(), "application/json", 422,
         "unknown_field"),
        ("eps", "/v1/search/image", *multipart({}, b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n"), 422,
         "invalid_image"),
    ]


def test_bad_input_gets_clear_4xx_json_and_disturbs_no_one(serve_app, reference):
    image = Path(reference["items"].image_paths[0]).read_bytes()
    good = {"query": reference["items"].captions[0], "k": 10}
    want = post_json(f"{serve_app}/v1/search/text", good)[1]["results"]
    cases = bad_requests(image)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:  # bad and good requests at the same time
        bad = [pool.submit(call, f"{serve_app}{path}", body, kind) for _, path, body, kind, _, _ in cases]
        fine = [pool.submit(post_json, f"{serve_app}/v1/search/text", good) for _ in range(10)]
        for (name, _, _, _, status, code), future in zip(cases, bad):
            got_status, body = future.result()
            assert (got_status, body["error"]["code"]) == (status, code), name
            assert body["error"]["message"], name
        for future in fine:
            status, body = future.result()
            assert status == 200 and body["results"] == want
    status, body = call(f"{serve_app}/v1/search/similar/no/such/image.jpg")
    assert status == 404 and body["error"]["code"] == "unknown_id"


def test_health_readiness_metrics_and_docs(serve_app, ray_metrics_url):
    assert call(f"{serve_app}/v1/healthz") == (200, {"status": "ok"})
    status, body = call(f"{serve_app}/v1/readyz")
    assert status == 200 and body["ready"] and len(body["shards"]) == 6
    assert all(s["ready_replicas"] == 1 for s in body["shards"]) and not body["degraded"]
    assert {r["deployment"] for r in body["replicas"]} == {"images-shard-00000-00002", "captions-shard-00000-00002"}
    status, schema = call(f"{serve_app}/openapi.json")
    assert status == 200 and {"/v1/search/text", "/v1/search/image", "/v1/captions", "/v1/readyz"} <= set(schema["paths"])
    text_body = schema["paths"]["/v1/search/text"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"query", "k", "rerank", "fusion"} <= set(text_body["properties"]) and text_body["required"] == ["query"]
    assert "multipart/form-data" in schema["paths"]["/v1/search/image"]["post"]["requestBody"]["content"]
    assert call(f"{serve_app}/docs")[0] == 200
    # Request counts by status live in Ray's metrics (summed over router replicas by a scrape of each node).
    assert post_json(f"{serve_app}/v1/search/text", {"query": "a", "k": "²"})[0] == 422
    assert call(f"{serve_app}/v1/no/such/path")[0] == 404
    wanted = ('terrahash_requests_total{', 'endpoint="text"', 'status="422"')
    deadline = time.monotonic() + 30
    while True:
        lines = [line for line in call(ray_metrics_url)[1].splitlines() if line.startswith("ray_terrahash_requests")]
        if any(all(w in line for w in wanted) for line in lines) and any('status="404"' in line for line in lines):
            break
        assert time.monotonic() < deadline, lines
        time.sleep(1)
    assert call(f"{serve_app}/metrics")[0] == 404  # no per-replica registry that a scrape would see at random


def test_the_api_reference_is_the_live_openapi_document(serve_app):
    """docs/api.md is what the running app's /openapi.json renders to: every route with its permission, example
    answer, errors and headers (serving/runtime/openapi_docs.py)."""
    from serving.runtime.openapi_docs import REGENERATE, undocumented
    from serving.runtime.reference import render

    status, document = call(f"{serve_app}/openapi.json")
    assert status == 200
    missing = undocumented(document)
    assert not missing, (f"routes without docs: {missing}; add each route's endpoint to serving.governance.roles."
                         f"ENDPOINTS and its entry to DOCS in serving/runtime/openapi_docs.py, then run `{REGENERATE}`")
    assert render(document) == (REPO / "docs" / "api.md").read_text(), \
        f"docs/api.md is not the live /openapi.json rendered: run `{REGENERATE}` and commit docs/api.md"


def test_reconfigure_changes_limits_without_a_restart(serve_app, built_index, jscc_link, code_links):
    from serving.app import run_apps

    # The fixture's settings but for the limits changed here, so the app is left as the later tests expect it.
    settings = dict(index=str(built_index["root"]), shard_replicas=1, spread_shards=False, shard_num_cpus=0.05,
                    encoder_num_cpus=0.1, router_num_cpus=0.05, max_upload_bytes=200_000,
                    max_image_pixels=1_000_000, max_query_chars=200, jscc_model=str(jscc_link["folder"]),
                    code_link_model=str(code_links))
    status, in_router = post_json(f"{serve_app}/v1/search/text", {"query": "a river", "k": 5})
    assert status == 200
    try:
        # Also the split layout: text encoded by the encoder deployment, one shard deployment per shard.
        run_apps(ServeSettings(**settings, max_k=5, default_k=5, layout="split", router_encodes_text=False,
                               shards_per_replica=1))
        status, body = post_json(f"{serve_app}/v1/search/text", {"query": "a river", "k": 6})
        assert status == 422 and "1 to 5" in body["error"]["message"]
        status, body = post_json(f"{serve_app}/v1/search/text", {"query": "a river", "k": 5})
        assert status == 200 and body["results"] == in_router["results"]
    finally:
        run_apps(ServeSettings(**settings, max_k=50, shards_per_replica=3))
    with pytest.raises(ValueError, match="max_kk: unknown key"):
        ServeSettings.from_dict({"index": "x", "max_kk": 3})


def test_a_corrupted_shard_is_refused_and_readiness_says_why(serve_app, built_index, tmp_path):
    import ray

    from serving.app import delete_apps, run_apps

    root = tmp_path / "corrupt"
    shutil.copytree(built_index["root"], root)
    victim = root / "index" / "images" / "v0001" / "shard-00002.ids.npy"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    settings = ServeSettings(index=str(root), shard_replicas=1, spread_shards=False, shard_num_cpus=0.05,
                             encoder_num_cpus=0.1, router_num_cpus=0.05, shards_per_replica=1)
    run_apps(settings, name="corrupt", route_prefix="/corrupt")
    try:
        deadline = time.monotonic() + 60
        status, body = call(f"{serve_app}/corrupt/v1/readyz")
        while not body.get("shards") and time.monotonic() < deadline:  # the router is still finding its arm
            time.sleep(0.2)
            status, body = call(f"{serve_app}/corrupt/v1/readyz")
        assert status == 503 and not body["ready"]
        bad = [s for s in body["shards"] if not s["ready"]]
        assert [s["shard"] for s in bad] == ["images/v0001/shard-00002"]
        assert "checksum mismatch" in bad[0]["problem"] and "shard-00002.ids.npy" in bad[0]["problem"]
        status, body = post_json(f"{serve_app}/corrupt/v1/search/text", {"query": "a river"})
        assert status == 503 and body["error"]["code"] == "shard_not_ready"
        logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "serve"
        # the router's replica holds the shards, co-located
        lines = [line for f in logs.glob("replica_corrupt*.log") for line in f.read_text().splitlines()
                 if "refusing shard images/v0001/shard-00002" in line]
        assert lines and "checksum mismatch" in lines[0]
    finally:
        delete_apps("corrupt")
    wait_http(f"{serve_app}/v1/readyz")  # the other app never noticed


def test_an_encoder_of_another_code_space_is_refused_at_build(built_index, model_dir, tmp_path):
    """A ``model`` override whose students were trained into other codes (same bits) cannot serve the index."""
    from serving.app import check_arms

    other = tmp_path / "other_model"
    shutil.copytree(model_dir, other)
    for spec in other.glob("*.spec.json"):
        data = json.loads(spec.read_text())
        spec.write_text(json.dumps({**data, "code_space": "sha256:" + "0" * 64}))
    with pytest.raises(ValueError) as err:
        check_arms(ServeSettings(index=str(built_index["root"]), model=str(other)))
    message = str(err.value)
    assert "sha256:" + "0" * 64 in message and built_index["images"]["code_space"] in message
    assert str(other) in message and "index/images/v0001/manifest.json" in message


def test_serving_app_imports_no_torch(built_index, ucm_many, tmp_path):
    """Everything a replica runs, in one process: the three applications built (manifests read), the model
    loaded and used by both encoders, the canary's probes read; then no torch, timm or transformers."""
    code = f"""
import sys, numpy as np
import cluster.cli.serving, serving.ingest.build, serving.lifecycle.canary, serving.lifecycle.control, serving.runtime.router
from serving.app import ServeSettings, index_app, model_app, router_app
from serving.model.encoders import ImageEncoder, TextEncoder
from serving.runtime.query_encoder import load_model
from serving.runtime.serve_config import app_specs
settings = ServeSettings(index={str(built_index['root'])!r}, shard_replicas=1, spread_shards=False,
                         canary={{"probe_data": {str(ucm_many)!r}}})
for spec in app_specs(settings):
    {{"index": index_app, "model": model_app, "router": router_app}}[spec["kind"]](spec["args"])
model = load_model(None, settings.index, None, "fp32")
assert TextEncoder(model["text_spec"]).encode(["a river"]).shape == (1, model["bits"])
pixels = np.zeros((model["image_size"], model["image_size"], 3), np.uint8)
assert ImageEncoder(model["image_spec"]).encode([pixels]).shape == (1, model["bits"])
assert serving.lifecycle.canary.load_probes({str(ucm_many)!r}, 8)["queries"]
bad = sorted(m for m in ("torch", "timm", "transformers") if m in sys.modules)
print("HEAVY", bad)
sys.exit(1 if bad else 0)
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0 and "HEAVY []" in result.stdout, result.stdout[-2000:] + result.stderr[-3000:]


def test_the_app_serves_an_index_from_s3(serve_app, built_index, s3_endpoint, monkeypatch):
    """The same index, uploaded to an S3 endpoint on loopback, served by replicas that read it from there."""
    import uuid

    import boto3
    from serving.app import delete_apps, run_apps

    prefix = f"served/{uuid.uuid4().hex}"
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    local = Path(built_index["root"])
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        client.upload_file(str(path), "terrahash-test", f"{prefix}/{path.relative_to(local).as_posix()}")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)  # for run_apps, which reads the manifests here
    env = {name: os.environ[name] for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                               "AWS_DEFAULT_REGION")}
    settings = ServeSettings(index=f"s3://terrahash-test/{prefix}", shard_replicas=1, spread_shards=False,
                             shard_num_cpus=0.05, encoder_num_cpus=0.1, router_num_cpus=0.05,
                             runtime_env={"env_vars": env})
    run_apps(settings, name="s3", route_prefix="/s3")
    try:
        wait_http(f"{serve_app}/s3/v1/readyz")
        query = {"query": "a beach with white waves", "k": 10}
        status, from_s3 = post_json(f"{serve_app}/s3/v1/search/text", query)
        assert status == 200 and len(from_s3["results"]) == 10
        assert from_s3["results"] == post_json(f"{serve_app}/v1/search/text", query)[1]["results"]
    finally:
        delete_apps("s3")


def test_the_shipped_serve_config_is_rendered_from_the_shipped_settings():
    """serving/deploy.yaml is what `terrahash serve --render` writes from serving/serve.yaml: a valid Serve
    config whose applications' args are ServeSettings and whose user_configs are the hot settings."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from serving.runtime.access import AccessConfig
    from serving.runtime.serve_config import serve_config
    from serving.runtime.settings import check_hot_settings, load_settings
    from serving.runtime.traffic import check_traffic

    shipped = Path(__file__).parents[2] / "serving"
    deployed = yaml.safe_load((shipped / "deploy.yaml").read_text())
    assert deployed == serve_config(load_settings(shipped / "serve.yaml"), host="0.0.0.0"), \
        "serving/deploy.yaml is stale: run terrahash serve --config serving/serve.yaml --render serving/deploy.yaml --host 0.0.0.0"
    config = ServeDeploySchema.model_validate(deployed)
    kinds = {app.import_path.rsplit(":", 1)[1]: app for app in config.applications}
    # co-located: no encoder applications, the routers load the arms' models; one index app for both arms
    assert set(kinds) == {"index_app", "router_app"} and len(config.applications) == 2
    assert kinds["router_app"].args["layout"] == "colocated"
    for app in config.applications:
        ServeSettings.from_dict(app.args)
    router = {d.name: d.user_config for d in kinds["router_app"].deployments}
    hot = {k: v for k, v in router["Router"].items() if k not in ("traffic", "access")}
    assert check_hot_settings(hot) == hot and set(hot) == set(ServeSettings.HOT_ROUTER)
    access = AccessConfig.check(router["Router"]["access"])  # a cluster deploys with auth on
    assert access.enabled and access.keys.startswith("s3://") and access.policy["roles"]["restricted"]["rules"]
    assert access.audit and access.on_failure == "closed"
    assert [a.name for a in check_traffic(router["Router"]["traffic"]).arms] == ["champion", "challenger"]
    assert router["Canary"]["traffic"] == router["Router"]["traffic"]


def test_symbols_received_over_a_radio_link_are_decoded_and_searched(serve_app, reference, jscc_link, ucm_many):
    """POST /v1/search/received: the ONNX decoder's image, encoded by the served student, ranks as the
    unsharded index ranks its code; the source hash gives the bit agreement; bad symbols get 4xx JSON."""
    import base64

    import torch

    from serving.model.encoders import decode_and_resize
    from serving.runtime.jscc import ReceivedDecoder
    from training.features import load_image
    from training.jscc_export import received_message, send

    decoder = ReceivedDecoder(jscc_link["folder"])
    path = reference["items"].image_paths[5]
    image = torch.from_numpy(load_image(Path(path), 32)).permute(2, 0, 1).float().div_(255.0)
    symbols, _ = send(jscc_link["link"], image, -5.0, seed=1)
    pixels = decode_and_resize(decoder.image(symbols, -5.0), 64)
    code = reference["image"].encode([pixels])
    sent_code = reference["image"].encode([Path(path).read_bytes()])
    source = np.packbits(sent_code[0] >= 0).tobytes()
    body = received_message(symbols, -5.0, 2, decoder.model_version, source, k=8)
    status, answer = post_json(f"{serve_app}/v1/search/received", body)
    assert status == 200, answer
    assert got(answer) == expected(reference, reference["image"].encode_packed([pixels]), 8)
    assert answer["received"]["bit_agreement"] == pytest.approx(float(((code[0] >= 0) == (sent_code[0] >= 0)).mean()))
    assert answer["received"]["model_version"] == decoder.model_version and answer["received"]["hops_received"] == 2
    assert "jscc_decode" in answer["timings_ms"]

    def bad(change: dict) -> tuple[int, str]:
        status, answer = post_json(f"{serve_app}/v1/search/received", {**body, **change})
        return status, answer["error"]["code"]

    nan = symbols.copy()
    nan[3] = np.nan
    assert bad({"symbols": base64.b64encode(symbols[:-1].tobytes()).decode()}) == (422, "invalid_symbols")
    assert bad({"symbols": base64.b64encode(nan.tobytes()).decode()}) == (422, "invalid_symbols")
    assert bad({"symbols": "not base64!"}) == (422, "invalid_symbols")
    assert bad({"model_version": "0" * 16}) == (409, "unknown_model_version")
    assert bad({"source_hash": "ab"}) == (422, "invalid_source_hash")
    assert bad({"snr_db": 99}) == (422, "invalid_snr")
    assert bad({"extra": 1})[0] == 422
    assert bad({"model_version": None}) == (422, "missing_model_version")
    assert call(f"{serve_app}/v1/healthz") == (200, {"status": "ok"})  # nothing of that hurt the replica


def test_hash_codes_received_over_a_code_link_are_decoded_and_searched(serve_app, reference, code_links, model_dir):
    """POST /v1/search/received with a code link: repetition-coded symbols at a high SNR give back the
    sender's code and its ranking; a learned codec's symbols rank as its decoded code; bad symbols, links
    and code spaces get JSON 4xx."""
    from serving.model import code_link
    from serving.model.codes import pack_signs
    from serving.model.field import code_message, student_code_space, student_spec
    from serving.model.learned_link import load_codecs

    path = reference["items"].image_paths[7]
    code = reference["image"].encode([Path(path).read_bytes()])  # (1, bits): the field unit's code
    bits, space = code.shape[1], student_code_space(student_spec(model_dir))
    source = np.packbits(code[0] >= 0).tobytes()
    rng = np.random.default_rng(3)
    repetition = code_link.Repetition("bpsk", bits, 4 * bits)
    symbols = code_link.received_symbols(code, 3, 25.0, repetition, rng)[0]
    body = code_message(symbols, scheme="repetition", modulation="bpsk", snr_db=25.0, hops=3, code_space=space,
                        source_hash=source, k=8)
    status, answer = post_json(f"{serve_app}/v1/search/received", body)
    assert status == 200, answer
    assert got(answer) == expected(reference, pack_signs(code), 8)
    assert answer["received"]["bit_agreement"] == 1.0 and answer["received"]["repeats"] == 4
    assert answer["received"]["scheme"] == "repetition" and answer["received"]["hops_received"] == 3
    assert "link_decode" in answer["timings_ms"]

    codec = load_codecs(code_links)[0]  # 8 channel uses: fewer than the code's bits
    sent = codec.received_symbols(code, 2, -5.0, rng)[0].astype(np.complex64)
    decoded = codec.receive(sent[None], -5.0).soft
    learned = code_message(sent, scheme="learned", snr_db=-5.0, hops=2, code_space=space,
                           model_version=codec.spec["model_version"], source_hash=source, k=8)
    status, answer = post_json(f"{serve_app}/v1/search/received", learned)
    assert status == 200, answer
    assert got(answer) == expected(reference, pack_signs(decoded), 8)
    assert answer["received"]["bit_agreement"] == pytest.approx(float(((decoded[0] >= 0) == (code[0] >= 0)).mean()))
    status, answer = post_json(f"{serve_app}/v1/search/received", {**learned, "rerank": "asymmetric"})
    assert status == 200 and answer["rerank"] == "asymmetric"

    def bad(body: dict, change: dict, link: dict | None = None) -> tuple[int, str]:
        changed = {**body, **change, "link": {**body["link"], **(link or {})}}
        status, answer = post_json(f"{serve_app}/v1/search/received", changed)
        return status, answer["error"]["code"]

    nan = symbols.astype(np.complex64)
    nan[2] = np.nan
    assert bad(body, {"symbols": base64.b64encode(nan[:-1].tobytes()).decode()}) == (422, "invalid_symbols")
    assert bad(body, {"symbols": base64.b64encode(nan.tobytes()).decode()}) == (422, "invalid_symbols")
    assert bad(body, {}, {"channel_uses": bits // 2}) == (422, "invalid_symbols")  # the symbols are not n long
    short = code_message(symbols[:bits // 2], scheme="repetition", snr_db=25.0, hops=3, code_space=space)
    assert bad(short, {}) == (422, "invalid_link")  # BPSK: n/2 uses cannot carry the code
    assert bad(body, {}, {"code_space": "sha256:" + "0" * 64}) == (409, "code_space_mismatch")
    assert bad(body, {}, {"protocol": "pixels"}) == (422, "invalid_link")
    assert bad(learned, {"symbols": body["symbols"]}, {"channel_uses": 4 * bits}) == (404, "unknown_link")
    assert bad(learned, {}, {"model_version": "0" * 16}) == (404, "unknown_link")
    no_space = {**body, "link": {k: v for k, v in body["link"].items() if k != "code_space"}}
    status, answer = post_json(f"{serve_app}/v1/search/received", no_space)
    assert (status, answer["error"]["code"]) == (422, "invalid_link") and "link.code_space" in answer["error"]["message"]
    assert bad(body, {}, {"extra": 1}) == (422, "invalid_link")
    huge = np.full(8, 3e38 + 3e38j, np.complex64)  # finite, but no decoder's arithmetic survives it
    status, answer = post_json(f"{serve_app}/v1/search/received",
                               {**learned, "symbols": base64.b64encode(huge.tobytes()).decode(), "rerank": "asymmetric"})
    assert status in (200, 422) and ("results" in answer or answer["error"]["code"] == "invalid_symbols"), answer
    assert call(f"{serve_app}/v1/healthz") == (200, {"status": "ok"})

