"""The edge server over real HTTP: the service's request bodies, answers and JSON errors, thumbnails."""
from __future__ import annotations

import base64
import json
import threading
import urllib.error
import urllib.request

import pytest

from serving.edge.http import make_server
from serving.edge.searcher import EdgeSearcher
from serving.ingest.dataset import load_dataset


@pytest.fixture(scope="module")
def edge_url(bundles):
    searcher = EdgeSearcher(bundles["int8"])
    server = make_server(searcher, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", searcher
    server.shutdown()
    server.server_close()


def call(url: str, data: bytes | None = None, content_type: str = "application/json", method: str | None = None):
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": content_type} if data is not None else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            body = answer.read()
            return answer.status, answer.headers["Content-Type"], body
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read()


def test_text_and_image_searches_answer_as_in_process(edge_url, ucm_many):
    url, searcher = edge_url
    body = {"query": "a river through fields", "k": 5, "rerank": "asymmetric"}
    status, kind, data = call(f"{url}/v1/search/text", json.dumps(body).encode())
    answer = json.loads(data)
    assert status == 200 and kind == "application/json" and answer["arm"] == "edge" and len(answer["results"]) == 5
    assert answer["results"] == searcher.search_text(body)["results"]
    raw = load_dataset(ucm_many).records[0].path.read_bytes()
    status, _, data = call(f"{url}/v1/search/image?k=3", raw, "image/jpeg")
    by_raw = json.loads(data)
    status_b64, _, data = call(f"{url}/v1/search/image", json.dumps({"image_base64": base64.b64encode(raw).decode(),
                                                                     "k": 3}).encode())
    assert status == status_b64 == 200 and json.loads(data)["results"] == by_raw["results"]
    assert [h["id"] for h in by_raw["results"]] == [h["id"] for h in searcher.search_image(raw, {"k": 3})["results"]]
    thumbnail = by_raw["results"][0]["thumbnail"]
    status, kind, data = call(f"{url}{thumbnail}")
    assert status == 200 and kind == "image/jpeg" and data[:3] == b"\xff\xd8\xff"


@pytest.mark.parametrize("path, data, content_type, status, code", [
    ("/v1/search/text", b"{not json", "application/json", 400, "invalid_json"),
    ("/v1/search/text", b"[1]", "application/json", 400, "invalid_json"),
    ("/v1/search/text", b'{"query": "x", "k": 0}', "application/json", 422, "k_out_of_range"),
    ("/v1/search/text", b'{"query": "x", "k": true}', "application/json", 422, "k_out_of_range"),
    ("/v1/search/text", b'{"query": "x", "top": 3}', "application/json", 422, "unknown_field"),
    ("/v1/search/text", b'{"k": 3}', "application/json", 422, "missing_query"),
    ("/v1/search/text", b'{"query": "x", "format": "stac"}', "application/json", 422, "invalid_format"),
    ("/v1/search/text", b'{"query": "x", "bbox": [0, 0, 1, 1]}', "application/json", 422, "no_footprints"),
    ("/v1/search/text", b"query=x", "text/plain", 415, "unsupported_media_type"),
    ("/v1/search/image", b"not an image", "image/jpeg", 422, "invalid_image"),
    ("/v1/search/image", b'{"image_base64": "%%%"}', "application/json", 422, "invalid_image"),
    ("/v1/search/image?k=3&colour=red", b"x", "image/png", 422, "unknown_field"),
    ("/v1/search/items", b"{}", "application/json", 404, "not_found"),
    ("/v1/items/no/such.jpg/thumbnail", None, None, 404, "unknown_id"),
    ("/v1/search/text", None, None, 405, "method_not_allowed"),
])
def test_bad_requests_get_the_services_json_errors(edge_url, path, data, content_type, status, code):
    url, _ = edge_url
    got, kind, body = call(f"{url}{path}", data, content_type or "application/json")
    assert (got, kind) == (status, "application/json") and json.loads(body)["error"]["code"] == code, body
    assert call(f"{url}/v1/healthz")[0] == 200  # and the server goes on answering


def test_a_body_over_the_limit_is_refused_before_it_is_read(edge_url):
    url, searcher = edge_url
    limit = searcher.config["max_upload_bytes"]
    status, _, body = call(f"{url}/v1/search/image", b"x" * (limit + 1), "image/jpeg")
    assert status == 413 and json.loads(body)["error"]["code"] == "payload_too_large"
