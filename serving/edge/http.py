"""A small local HTTP server over one bundle, with the standard library alone: the service's
``/v1/search/text`` and ``/v1/search/image`` requests and answers, so that a client written against the
service works against a laptop in the field.

Routes: ``POST /v1/search/text`` (JSON), ``POST /v1/search/image`` (JSON with ``image_base64``, or a raw
``image/*`` body with k, rerank, fusion, bbox and datetime in the query string), ``GET
/v1/items/{image id}/thumbnail`` (when the bundle has thumbnails), ``GET /v1/healthz``, ``GET /v1/readyz``,
``GET /v1/bundle`` (what the bundle holds). Every failure is ``{"error": {"code", "message"}}`` with the
service's status and code. Requests are served on threads; the bundle is opened once.
"""
from __future__ import annotations

import json
import logging
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, unquote, urlsplit

from serving.runtime.checks import ApiError, base64_limit, decode_base64

from .searcher import EdgeSearcher

log = logging.getLogger(__name__)

OPTIONS = ("k", "rerank", "fusion", "format", "bbox", "datetime")
BODIES = {"/v1/search/text": ("query", *OPTIONS), "/v1/search/image": ("image_base64", *OPTIONS)}
_TYPES = {"query": (str,), "image_base64": (str,), "k": (int,), "rerank": (str,), "fusion": (str,),
          "format": (str,), "bbox": (list, str), "datetime": (str,)}
_CODES = {"k": "k_out_of_range", "query": "invalid_query", "rerank": "invalid_rerank", "fusion": "invalid_fusion",
          "image_base64": "invalid_image", "bbox": "invalid_bbox", "datetime": "invalid_datetime",
          "format": "invalid_format"}  # serving.runtime.api's codes for a field of the wrong type
THUMBNAIL_PREFIX, THUMBNAIL_SUFFIX = "/v1/items/", "/thumbnail"


def make_server(searcher: EdgeSearcher, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """The server, bound and ready for ``serve_forever`` (port 0: a free port, see ``server_address``)."""
    handler = type("Handler", (_Handler,), {"searcher": searcher})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def check_body(payload, fields: tuple[str, ...]) -> dict:
    """A JSON body checked as the service's declared models check it: an object, known fields, right types."""
    if not isinstance(payload, dict):
        raise ApiError(400, "invalid_json", "the body must be a JSON object")
    for name, value in payload.items():
        if name not in fields:
            raise ApiError(422, "unknown_field", f"unknown field {name!r}; known: {sorted(fields)}")
        if value is not None and (not isinstance(value, _TYPES[name]) or isinstance(value, bool)):
            raise ApiError(422, _CODES[name], f"{name}: not a valid {' or '.join(t.__name__ for t in _TYPES[name])}")
    required = fields[0]
    if payload.get(required) is None:
        raise ApiError(422, "missing_image" if required == "image_base64" else f"missing_{required}",
                       f"the body needs {required!r}")
    if payload.get("format") not in (None, "json"):
        raise ApiError(422, "invalid_format", "a bundle answers JSON only (format 'json')")
    return payload


class _Handler(BaseHTTPRequestHandler):
    searcher: EdgeSearcher
    server_version = "terrahash-edge"
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # quiet: one debug line per request
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self):
        self._answer(self._get)

    def do_POST(self):
        self._answer(self._post)

    def _answer(self, handler) -> None:
        try:
            status, body, content_type = handler(urlsplit(self.path))
        except ApiError as err:
            status, body, content_type = err.status, _error(err.code, err.message), "application/json"
        except Exception:
            rid = uuid.uuid4().hex[:12]
            log.exception("unexpected error in request %s", rid)
            status, content_type = 500, "application/json"
            body = _error("internal_error", f"the server failed on this request; quote request id {rid} when "
                                            f"reporting it", rid)
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _get(self, url):
        if url.path in ("/v1/healthz", "/v1/readyz"):
            return 200, {"status": "ok"}, "application/json"
        if url.path == "/v1/bundle":
            return 200, self.searcher.describe(), "application/json"
        if url.path.startswith(THUMBNAIL_PREFIX) and url.path.endswith(THUMBNAIL_SUFFIX):
            image_id = unquote(url.path[len(THUMBNAIL_PREFIX):-len(THUMBNAIL_SUFFIX)])
            jpeg = self.searcher.thumbnail(image_id)
            if jpeg is None:
                raise ApiError(404, "unknown_id", f"the bundle has no thumbnail of {image_id!r}")
            return 200, jpeg, "image/jpeg"
        self._refuse_other(url, "GET")

    def _post(self, url):
        config = self.searcher.config
        if url.path == "/v1/search/text":
            body = check_body(self._json(config["max_query_chars"] * 4 + 4096), BODIES[url.path])
            return 200, self.searcher.search_text(body), "application/json"
        if url.path == "/v1/search/image":
            limit = config["max_upload_bytes"]
            content_type = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
            if content_type.startswith("image/"):
                params = dict(parse_qsl(url.query))
                unknown = sorted(set(params) - set(OPTIONS))
                if unknown:
                    raise ApiError(422, "unknown_field", f"unknown field {unknown[0]!r}; known: {sorted(OPTIONS)}")
                return 200, self.searcher.search_image(self._body(limit), params), "application/json"
            body = check_body(self._json(base64_limit(limit)), BODIES[url.path])
            data = decode_base64(body["image_base64"], limit)
            return 200, self.searcher.search_image(data, body), "application/json"
        self._refuse_other(url, "POST")

    def _refuse_other(self, url, method: str):
        known = {"GET": ("/v1/healthz", "/v1/readyz", "/v1/bundle"), "POST": tuple(BODIES)}
        other = "POST" if method == "GET" else "GET"
        if url.path in known[other]:
            raise ApiError(405, "method_not_allowed", f"{url.path} answers {other}, not {method}")
        raise ApiError(404, "not_found", f"no route {url.path} (this is an edge bundle's server: "
                                         f"{', '.join(BODIES)}, thumbnails, health)")

    def _body(self, limit: int) -> bytes:
        declared = self.headers.get("Content-Length", "")
        if not declared.isascii() or not declared.isdigit():
            raise ApiError(411, "length_required", "the request needs a Content-Length")
        if int(declared) > limit:
            self._discard(int(declared), limit)
            raise ApiError(413, "payload_too_large", f"the body is {declared} bytes; the limit is {limit}")
        return self.rfile.read(int(declared))

    def _discard(self, size: int, limit: int) -> None:
        """Read and drop a refused body (kept nowhere), so that the client reads the answer rather than a
        broken pipe; one far over the limit is not read, and the connection is closed instead."""
        if size > 4 * limit:
            self.close_connection = True
            return
        while size > 0:
            chunk = self.rfile.read(min(size, 1 << 16))
            if not chunk:  # the client went away
                break
            size -= len(chunk)

    def _json(self, limit: int):
        content_type = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            declared = self.headers.get("Content-Length", "")
            self._discard(int(declared) if declared.isascii() and declared.isdigit() else 1 << 62, 1 << 20)
            raise ApiError(415, "unsupported_media_type", f"content type {content_type or 'none'!r} is not accepted "
                                                          f"here; use one of ['application/json']")
        body = self._body(limit)
        try:
            return json.loads(body)
        except RecursionError:
            raise ApiError(400, "invalid_json", "the JSON body is nested too deeply") from None
        except (ValueError, UnicodeDecodeError) as err:
            raise ApiError(400, "invalid_json", f"the body is not valid JSON: {err}") from None


def _error(code: str, message: str, request_id: str | None = None) -> dict:
    return {"error": {"code": code, "message": message, **({"request_id": request_id} if request_id else {})}}
