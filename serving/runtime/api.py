"""HTTP request handling for the router: errors as JSON, declared bodies, size-limited reads, image decoding.

Every answer other than 200 is ``{"error": {"code", "message"}}`` (plus ``request_id`` for a 500).
Bodies are read with a size limit before anything parses them; JSON bodies are then validated by the
pydantic models below, which are also what ``/openapi.json`` declares (``openapi_extra`` of each route).
"""
from __future__ import annotations

from concurrent.futures import Executor
from typing import Literal

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from serving.runtime.checks import (ApiError, base64_limit, check_size, decode_base64, decode_image, parse_choice,
                                    parse_json)


def error_response(status: int, code: str, message: str, request_id: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    error = {"code": code, "message": message, **({"request_id": request_id} if request_id else {})}
    return JSONResponse({"error": error}, status_code=status, headers=headers)


# --- declared bodies (the OpenAPI schema of each endpoint) -------------------------------------------

_BODY = ConfigDict(extra="forbid")
K = Field(None, ge=1, description="results wanted (1 to the deployment's max_k; default its default_k)")


BBOX = Field(None, description="[west, south, east, north] in WGS84 degrees (or \"w,s,e,n\"): only items whose "
                               "footprint intersects it; west > east crosses the antimeridian")
DATETIME = Field(None, description="an RFC 3339 instant (2024-06-01T10:30:00Z), a date, or an interval A/B with "
                                   "an open end '..': only items whose acquisition time intersects it")
FORMAT = Field(None, description="'json' (default) or 'stac': the results as a STAC ItemCollection (GeoJSON); "
                                 "an Accept: application/geo+json header asks for it too")


class _Filters(BaseModel):
    model_config = _BODY
    bbox: list[float] | str | None = BBOX
    datetime: str | None = DATETIME


class _Options(_Filters):
    k: StrictInt | None = K
    rerank: Literal["none", "asymmetric", "fusion"] | None = None
    fusion: Literal["average", "max"] | None = None
    format: Literal["json", "stac"] | None = FORMAT


class TextSearch(_Options):
    """POST /v1/search/text"""

    query: str = Field(description="the text to search for (at most max_query_chars characters)")


class ImageSearch(_Options):
    """POST /v1/search/image with a JSON body"""

    image_base64: str = Field(description="the image file (JPEG, PNG, TIFF or WebP), base64-encoded")


class CaptionSearch(_Filters):
    """POST /v1/captions with a JSON body: an indexed image's id, or an image file."""

    image_id: str | None = Field(None, description="id of an indexed image")
    image_base64: str | None = Field(None, description="an image file, base64-encoded (when no image_id)")
    k: StrictInt | None = K


class ItemsSearch(_Filters):
    """POST /v1/search/items: the indexed items in a box and interval, ordered by id, a page at a time."""

    limit: StrictInt | None = Field(None, ge=1, description="items per page (1 to max_k; default 10x default_k, "
                                                            "at most max_k)")
    token: str | None = Field(None, description="the 'next' token of the previous page")
    format: Literal["json", "stac"] | None = FORMAT


class CodeLinkSpec(BaseModel):
    """The link a hash code came over (serving/model/field.py): what decodes its symbols into a code."""

    model_config = _BODY
    protocol: Literal["code"] = Field(description="'code': the symbols carry the image student's hash code")
    scheme: Literal["repetition", "learned"] = Field(
        description="'repetition': the code's signs, repeated, on `modulation`; 'learned': the deployment's learned "
                    "codec for `channel_uses` (`terrahash jscc train`, protocol code)")
    modulation: Literal["bpsk", "qpsk"] | None = Field(None, description="repetition: the modulation (default bpsk)")
    channel_uses: StrictInt = Field(ge=1, le=65536, description="n: complex channel uses (symbols) per code")
    code_space: str = Field(description="the code space of the sender's image student; the served arm's must match")
    model_version: str | None = Field(None, description="learned: the codec's model_version (its spec's)")


class ReceivedSearch(BaseModel):
    """POST /v1/search/received: a field query sent over a radio link: the last hop's DeepJSCC symbols of an
    image (``model_version`` names the decoder), or of its hash code (``link`` names the code link)."""

    model_config = _BODY
    symbols: str = Field(description="the received channel symbols: complex64 little-endian, base64-encoded (k "
                                     "symbols of the deployment's pixel link, or the code link's channel_uses; "
                                     "`terrahash jscc send` writes them)")
    snr_db: float = Field(ge=-30, le=30, description="the link's per-hop SNR in dB (a conditioned decoder is told it)")
    model_version: str | None = Field(None, description="pixel link: the decoder the sender's link was trained with "
                                                        "(its spec's model_version); required without `link`")
    link: CodeLinkSpec | None = Field(
        None, description="code link: the spec of the link the hash code came over: {\"protocol\": \"code\", "
                          "\"scheme\": \"repetition\" or \"learned\", \"modulation\": \"bpsk\" or \"qpsk\" "
                          "(repetition), \"channel_uses\": n, \"code_space\": the sender's student's, "
                          "\"model_version\": the learned codec's}")
    rerank: Literal["none", "asymmetric"] | None = Field(
        None, description="code link: 'asymmetric' re-ranks the top candidates by the decoded soft code's inner "
                          "product with their codes (default 'none': Hamming distance of its signs)")
    hops: StrictInt | None = Field(None, ge=1, le=8, description="hops the image travelled (reported back)")
    source_hash: str | None = Field(None, description="the sender's hash of its image, hex (as many bits as the "
                                                      "served codes): the answer gives the received image's bit "
                                                      "agreement with it")
    k: StrictInt | None = K


class Explain(BaseModel):
    """POST /v1/explain: a query (text, an image file, or an indexed image's id) and one result id."""

    model_config = _BODY
    result_id: str = Field(description="id of the indexed image to explain (a result of the query)")
    query: str | None = Field(None, description="a text query: leave-one-word-out attribution, and the occlusion "
                                                "map of the result image for it")
    image_base64: str | None = Field(None, description="an image query (JPEG, PNG, TIFF or WebP), base64-encoded")
    image_id: str | None = Field(None, description="an indexed image as the query")
    grid: StrictInt = Field(4, ge=2, le=8, description="cells per side of the occlusion map")


def _form_schema(fields: dict) -> dict:
    return {"type": "object", "required": ["image"],
            "properties": {"image": {"type": "string", "format": "binary"}, **fields}}


_OPTIONS = {"k": {"type": "string", "pattern": "^[0-9]+$"},
            "rerank": {"type": "string", "enum": ["none", "asymmetric", "fusion"]},
            "fusion": {"type": "string", "enum": ["average", "max"]},
            "bbox": {"type": "string", "description": "west,south,east,north (WGS84 degrees)"},
            "datetime": {"type": "string", "description": "RFC 3339 instant or interval A/B"},
            "format": {"type": "string", "enum": ["json", "stac"]}}


def _inlined(schema: dict) -> dict:
    """A JSON schema with its nested models (``$defs``) written in place of their ``$ref``s, so that it stands
    alone inside an OpenAPI document (whose ``#/`` is the document, not the schema)."""
    defs = schema.pop("$defs", {})

    def walk(node):
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return walk({**defs[ref.removeprefix("#/$defs/")], **{k: v for k, v in node.items() if k != "$ref"}})
            return {k: walk(v) for k, v in node.items()}
        return [walk(v) for v in node] if isinstance(node, list) else node
    return walk(schema)


def openapi_body(model: type[BaseModel], form_fields: dict | None = None) -> dict:
    """``openapi_extra`` declaring a JSON body of ``model`` (and, with ``form_fields``, an image upload)."""
    content = {"application/json": {"schema": _inlined(model.model_json_schema())}}
    if form_fields is not None:
        content["multipart/form-data"] = {"schema": _form_schema(form_fields)}
        content["image/*"] = {"schema": {"type": "string", "format": "binary"}}
    return {"requestBody": {"required": True, "content": content}}


TEXT_BODY = openapi_body(TextSearch)
IMAGE_BODY = openapi_body(ImageSearch, _OPTIONS)
CAPTION_BODY = openapi_body(CaptionSearch, {name: _OPTIONS[name] for name in ("k", "bbox", "datetime")})
ITEMS_BODY = openapi_body(ItemsSearch)
EXPLAIN_BODY = openapi_body(Explain)
RECEIVED_BODY = openapi_body(ReceivedSearch)

_FIELD_CODES = {"k": "k_out_of_range", "query": "invalid_query", "rerank": "invalid_rerank",
                "fusion": "invalid_fusion", "image_base64": "invalid_image", "image_id": "invalid_image_id",
                "bbox": "invalid_bbox", "datetime": "invalid_datetime", "format": "invalid_format",
                "limit": "limit_out_of_range", "token": "invalid_token", "result_id": "invalid_result_id",
                "grid": "invalid_grid", "symbols": "invalid_symbols", "snr_db": "invalid_snr",
                "model_version": "invalid_model_version", "hops": "invalid_hops", "source_hash": "invalid_source_hash",
                "link": "invalid_link"}
_NESTED_CODES = {"link": "invalid_link"}  # a nested object's own errors (missing or unknown keys too)


def parse_body(model: type[BaseModel], payload) -> BaseModel:
    """A JSON value checked against ``model``; 422 naming the first bad field (or 400 if not an object)."""
    if not isinstance(payload, dict):
        raise ApiError(400, "invalid_json", "the body must be a JSON object")
    try:
        return model.model_validate(payload)
    except ValidationError as err:
        first = err.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else ""
        if field in _NESTED_CODES and len(first["loc"]) > 1:  # inside a nested object: name the path
            path = ".".join(str(part) for part in first["loc"])
            raise ApiError(422, _NESTED_CODES[field], f"{path}: {first['msg']}") from None
        if first["type"] == "extra_forbidden":
            raise ApiError(422, "unknown_field", f"unknown field {field!r}; known: {sorted(model.model_fields)}") from None
        if first["type"] == "missing":
            code = "missing_image" if field == "image_base64" else f"missing_{field}"
            raise ApiError(422, code, f"the body needs {field!r}") from None
        raise ApiError(422, _FIELD_CODES.get(field, "invalid_request"), f"{field}: {first['msg']}") from None


# --- checks on values (limits are hot settings, so they are checked here, not in the models) -----------


def wants_stac(request: Request, params: dict) -> bool:
    """Whether the answer should be a STAC ItemCollection: ``format`` "stac", or an Accept of GeoJSON."""
    fmt = parse_choice(params.get("format"), ("json", "stac"), None, "format")
    if fmt is not None:
        return fmt == "stac"
    return "application/geo+json" in request.headers.get("accept", "")


# --- reading bodies --------------------------------------------------------------------------------


def require_content_type(request: Request, accepted: tuple[str, ...]) -> str:
    """The accepted prefix the request's content type starts with, else 415."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    for prefix in accepted:
        if content_type.startswith(prefix):
            return prefix
    raise ApiError(415, "unsupported_media_type",
                   f"content type {content_type or 'none'!r} is not accepted here; use one of {list(accepted)}")


async def read_limited(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes ``limit`` bytes (the declared length first)."""
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "payload_too_large", f"the body is {declared} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "payload_too_large", f"the body passed the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: Request, limit: int):
    """The JSON value of a size-limited ``application/json`` body; 400 if it does not parse."""
    require_content_type(request, ("application/json",))
    return parse_json(await read_limited(request, limit))


async def image_upload(request: Request, limit: int, model: type[BaseModel]) -> tuple[bytes | None, dict]:
    """(image bytes, other parameters) from a multipart form, JSON (``model``, base64 image), or a raw image
    body. JSON bodies come back as the model's fields, with bytes None when there is no ``image_base64``."""
    kind = require_content_type(request, ("multipart/form-data", "application/json", "image/"))
    if kind == "application/json":
        body = parse_body(model, await read_json(request, base64_limit(limit)))
        params = body.model_dump()
        if params.get("image_base64") is None and params.get("image_id") is not None:
            return None, params
        return decode_base64(params.get("image_base64"), limit), params
    body = await read_limited(request, limit + 64 * 1024)  # room for the form's own fields
    if kind == "image/":
        check_size(len(body), limit)
        return body, dict(request.query_params)
    request._body = body  # starlette parses the form from the body already read (and size-checked)
    try:
        form = await request.form()
    except Exception as err:  # malformed multipart
        raise ApiError(400, "invalid_form", f"cannot parse the multipart form: {err}") from None
    try:
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise ApiError(422, "missing_image", 'the form needs a file field named "image"')
        data = await upload.read()
        check_size(len(data), limit)
        return data, {k: v for k, v in form.items() if k != "image" and isinstance(v, str)}
    finally:
        await form.close()  # large parts are spooled to temporary files


async def decode_in_pool(pool: Executor, data: bytes, size: int, max_pixels: int) -> np.ndarray:
    """``decode_image`` in ``pool`` (bounded threads), so the event loop keeps serving other requests."""
    import asyncio

    return await asyncio.get_running_loop().run_in_executor(pool, decode_image, data, size, max_pixels)
