"""A small local HTTP server over one bundle, with the standard library alone: the service's
``/v1/search/text`` and ``/v1/search/image`` requests and answers, so that a client written against the
service works against a laptop in the field.

Routes: ``POST /v1/search/text`` (JSON), ``POST /v1/search/image`` (JSON with ``image_base64``, a multipart
form with an ``image`` file, or a raw ``image/*`` body with k, rerank, fusion, bbox and datetime in the query
string), ``GET
/v1/items/{image id}/thumbnail`` (when the bundle has thumbnails), ``GET /v1/healthz``, ``GET /v1/readyz``,
``GET /v1/bundle`` (what the bundle holds). Every failure is ``{"error": {"code", "message"}}`` with the
service's status and code. Requests are served on threads; the bundle is opened once.
"""
from __future__ import annotations

import email
import email.policy
import json
import logging
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, unquote, urlsplit

from serving.runtime.checks import (FUSION_RULES, RERANK_MODES, ApiError, base64_limit, check_size, decode_base64,
                                    parse_json)

from .searcher import EdgeSearcher

log = logging.getLogger(__name__)

OPTIONS = ("k", "rerank", "fusion", "format", "bbox", "datetime")
# the fields of serving.runtime.api's TextSearch and ImageSearch, in the order pydantic checks them
_FIELDS = ("bbox", "datetime", "k", "rerank", "fusion", "format")
BODIES = {"/v1/search/text": (*_FIELDS, "query"), "/v1/search/image": (*_FIELDS, "image_base64")}
_TYPES = {"query": (str,), "image_base64": (str,), "k": (int,), "rerank": (str,), "fusion": (str,),
          "format": (str,), "bbox": (list, str), "datetime": (str,)}
_CHOICES = {"rerank": RERANK_MODES, "fusion": FUSION_RULES, "format": ("json", "stac")}
_CODES = {"k": "k_out_of_range", "query": "invalid_query", "rerank": "invalid_rerank", "fusion": "invalid_fusion",
          "image_base64": "invalid_image", "bbox": "invalid_bbox", "datetime": "invalid_datetime",
          "format": "invalid_format"}  # serving.runtime.api's codes for a field of the wrong type
THUMBNAIL_PREFIX, THUMBNAIL_SUFFIX = "/v1/items/", "/thumbnail"
TIMEOUT_S = 30  # a client that stops sending (a body it declared, or nothing on a kept-alive connection)


def make_server(searcher: EdgeSearcher, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """The server, bound and ready for ``serve_forever`` (port 0: a free port, see ``server_address``)."""
    handler = type("Handler", (_Handler,), {"searcher": searcher})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def check_body(payload, fields: tuple[str, ...]) -> dict:
    """A JSON body checked as the service's declared models check it (serving.runtime.api.parse_body): an
    object; each declared field of the right type and value, in the models' order; the required one present;
    then no unknown field. The same status and code as the service for the first problem."""
    if not isinstance(payload, dict):
        raise ApiError(400, "invalid_json", "the body must be a JSON object")
    for name in fields:
        value = payload.get(name)
        if value is None:
            continue
        if not isinstance(value, _TYPES[name]) or isinstance(value, bool) or (
                name == "bbox" and isinstance(value, list)
                and not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
            raise ApiError(422, _CODES[name], f"{name}: not a valid {' or '.join(t.__name__ for t in _TYPES[name])}")
        if name == "k" and value < 1:
            raise ApiError(422, "k_out_of_range", f"k: must be at least 1, got {value}")
        if name in _CHOICES and value not in _CHOICES[name]:
            raise ApiError(422, _CODES[name], f"{name}: must be one of {list(_CHOICES[name])}, got {value!r}")
    required = fields[-1]
    if payload.get(required) is None:
        raise ApiError(422, "missing_image" if required == "image_base64" else f"missing_{required}",
                       f"the body needs {required!r}")
    unknown = sorted(set(payload) - set(fields))
    if unknown:
        raise ApiError(422, "unknown_field", f"unknown field {unknown[0]!r}; known: {sorted(fields)}")
    _json_only(payload.get("format"))
    return payload


def _json_only(fmt) -> None:
    if fmt not in (None, "json"):
        raise ApiError(422, "invalid_format", "a bundle answers JSON only (format 'json'); STAC items need the service")


class _Handler(BaseHTTPRequestHandler):
    searcher: EdgeSearcher
    server_version = "terrahash-edge"
    protocol_version = "HTTP/1.1"
    timeout = TIMEOUT_S

    def log_message(self, format, *args):  # quiet: one debug line per request
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self):
        self._answer(self._get)

    def do_POST(self):
        self._answer(self._post)

    def _answer(self, handler) -> None:
        self._unread = self._declared_length()  # body bytes not read yet: if any are left, the connection closes
        try:
            if "Transfer-Encoding" in self.headers:
                self._unread = None
                raise ApiError(411, "length_required", "send the body with a Content-Length (no chunked encoding)")
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
        if self._unread != 0:  # what is left of this body would be read as the next request
            self.close_connection = True
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
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
            data, params = self._image_upload(url, config["max_upload_bytes"])
            return 200, self.searcher.search_image(data, params), "application/json"
        self._refuse_other(url, "POST")

    def _image_upload(self, url, limit: int) -> tuple[bytes, dict]:
        """(image bytes, parameters) of a JSON body (base64), a raw ``image/*`` body (parameters in the query
        string), or a multipart form (field ``image``, the others as strings), as the service reads them."""
        content_type = self.headers.get("Content-Type", "")
        kind = content_type.split(";")[0].strip().lower()
        if kind == "application/json":
            body = check_body(self._json(base64_limit(limit)), BODIES["/v1/search/image"])
            return decode_base64(body["image_base64"], limit), body
        if kind.startswith("image/"):
            params = dict(parse_qsl(url.query, keep_blank_values=True))
            _json_only(params.get("format"))
            return self._body(limit), params
        if kind == "multipart/form-data":
            return _form_image(content_type, self._body(limit + 64 * 1024), limit)
        raise ApiError(415, "unsupported_media_type", f"content type {kind or 'none'!r} is not accepted here; use one "
                                                      f"of ['multipart/form-data', 'application/json', 'image/']")

    def _refuse_other(self, url, method: str):
        known = {"GET": ("/v1/healthz", "/v1/readyz", "/v1/bundle"), "POST": tuple(BODIES)}
        other = "POST" if method == "GET" else "GET"
        if url.path in known[other]:
            raise ApiError(405, "method_not_allowed", f"{url.path} answers {other}, not {method}")
        raise ApiError(404, "not_found", f"no route {url.path} (this is an edge bundle's server: "
                                         f"{', '.join(BODIES)}, thumbnails, health)")

    def _declared_length(self) -> int | None:
        declared = self.headers.get("Content-Length", "0") or "0"
        return int(declared) if declared.isascii() and declared.isdigit() else None

    def _body(self, limit: int) -> bytes:
        declared = self._declared_length()
        if declared is None:
            raise ApiError(411, "length_required", "the request needs a Content-Length")
        if declared > limit:
            self._discard(declared, limit)
            raise ApiError(413, "payload_too_large", f"the body is {declared} bytes; the limit is {limit}")
        data = self.rfile.read(declared)
        self._unread = declared - len(data)
        return data

    def _discard(self, size: int, limit: int) -> None:
        """Read and drop a refused body (kept nowhere), so that the client reads the answer rather than a
        broken pipe; one far over the limit is not read, and the connection is closed instead."""
        if size > 4 * limit:
            return
        while size > 0:
            chunk = self.rfile.read(min(size, 1 << 16))
            if not chunk:  # the client went away
                return
            size -= len(chunk)
        self._unread = 0

    def _json(self, limit: int):
        kind = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise ApiError(415, "unsupported_media_type", f"content type {kind or 'none'!r} is not accepted here; "
                                                          f"use one of ['application/json']")
        return parse_json(self._body(limit))


def _form_image(content_type: str, body: bytes, limit: int) -> tuple[bytes, dict]:
    """The ``image`` file and the other fields of a multipart/form-data body (the standard library's parser)."""
    message = email.message_from_bytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body,
                                       policy=email.policy.HTTP)
    if not message.is_multipart():
        raise ApiError(400, "invalid_form", "cannot parse the multipart form")
    image, params = None, {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name == "image" and part.get_filename() is not None:
            image = part.get_payload(decode=True) or b""
        elif isinstance(name, str) and part.get_filename() is None:  # the service keeps a form's string fields
            params[name] = part.get_content() if part.get_content_maintype() == "text" else ""
    if image is None:
        raise ApiError(422, "missing_image", 'the form needs a file field named "image"')
    check_size(len(image), limit)
    _json_only(params.get("format"))
    return image, params


def _error(code: str, message: str, request_id: str | None = None) -> dict:
    return {"error": {"code": code, "message": message, **({"request_id": request_id} if request_id else {})}}
