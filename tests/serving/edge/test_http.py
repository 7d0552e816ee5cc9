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
    ("/v1/search/image?k=3&colour=red", b"x", "image/png", 422, "invalid_image"),  # unknown: ignored, as the service
    ("/v1/search/image?k=", b"x", "image/png", 422, "k_out_of_range"),
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


@pytest.mark.parametrize("body", [
    {"query": "x", "k": 0}, {"query": "  "}, {"query": "x", "kk": 1}, {"query": "", "rerank": "best"},
    {"query": 3, "top": 1}, {"k": "3"}, {"query": "x", "fusion": "min", "k": True}, {"query": "x", "bbox": [0, "a"]},
    {"query": "x", "format": "xml"}, {"query": "x", "datetime": 2024}, {"top": 1}, [], {"image_base64": "x"}])
def test_bodies_are_refused_with_the_services_first_code(body):
    """The edge's check of a JSON body against the service's own (pydantic) one: the same first status and code."""
    from serving.edge.http import BODIES, check_body
    from serving.runtime.api import TextSearch, parse_body
    from serving.runtime.checks import ApiError

    def outcome(check):
        try:
            check()
        except ApiError as err:
            return err.status, err.code
        return None

    service = outcome(lambda: parse_body(TextSearch, body))
    edge = outcome(lambda: check_body(body, BODIES["/v1/search/text"]))
    assert edge == service, body


def test_requests_cannot_ride_on_an_unread_body(edge_url):
    """An error answered before its body is read closes the connection: the body is never read as a request."""
    import socket

    url, _ = edge_url
    host, port = url.removeprefix("http://").split(":")
    smuggled = b"GET /v1/healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    for head in (b"POST /v1/nothing HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n",
                 b"POST /v1/search/text HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"):
        with socket.create_connection((host, int(port)), timeout=10) as conn:
            conn.sendall(head + b"Content-Length: %d\r\n\r\n" % len(smuggled) + smuggled
                         if b"chunked" not in head else head + b"\r\n" + smuggled)
            answer = b""
            while chunk := conn.recv(65536):
                answer += chunk
        assert answer.count(b"HTTP/1.1 ") == 1 and b"Connection: close" in answer, answer[:300]


def test_a_multipart_upload_answers_as_a_raw_one(edge_url, ucm_many):
    import uuid

    url, _ = edge_url
    raw = load_dataset(ucm_many).records[3].path.read_bytes()
    boundary = uuid.uuid4().hex
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"k\"\r\n\r\n4\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + raw + f"\r\n--{boundary}--\r\n".encode()
    status, _, data = call(f"{url}/v1/search/image", form, f"multipart/form-data; boundary={boundary}")
    by_raw = json.loads(call(f"{url}/v1/search/image?k=4", raw, "image/jpeg")[2])
    assert status == 200 and json.loads(data)["results"] == by_raw["results"] and len(by_raw["results"]) == 4
