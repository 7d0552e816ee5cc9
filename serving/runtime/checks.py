"""Checks on a search request's values, with no web framework: the errors every HTTP answer carries
(``ApiError``: status, stable code, message), k, query, filters, base64 and image bytes.

The Serve router (serving.runtime.api) and the offline edge server (serving.edge.http) both answer
with these, so that a bad request gets the same status and code from either.
"""
from __future__ import annotations

import base64
import binascii
import io
import json

import numpy as np
from PIL import Image

RERANK_MODES = ("none", "asymmetric", "fusion")
FUSION_RULES = ("average", "max")

# Formats an upload may be in. Pillow is never asked to open anything else (EPS, for one, runs Ghostscript).
IMAGE_FORMATS = ("JPEG", "PNG", "TIFF", "WEBP")

class ApiError(Exception):
    """An answer other than 200: HTTP status, a stable machine code and a message for people; ``headers``
    to send with it (``Retry-After``, ``WWW-Authenticate``) and the audit trail's ``decision`` about it."""

    # ``arm_specific``: a refusal by this arm's model alone (a code of another code space): the dispatcher
    # answers from the primary instead, and counts it against neither arm (serving/runtime/dispatch.py).
    arm_specific = False

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None,
                 decision: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers, self.decision = headers or {}, decision



def parse_k(value, config: dict) -> int:
    """k from a JSON int or a form/query string of ASCII digits; 422 outside 1..max_k."""
    if value is None:
        return config["default_k"]
    if isinstance(value, str) and value.isascii() and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(422, "k_out_of_range", f"k must be an integer from 1 to {config['max_k']}, got {value!r}")
    if not 1 <= value <= config["max_k"]:
        raise ApiError(422, "k_out_of_range", f"k must be from 1 to {config['max_k']}, got {value}")
    return value


def parse_choice(value, choices, default, name):
    if value is None:
        return default
    if value not in choices:
        raise ApiError(422, f"invalid_{name}", f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def parse_options(params: dict, config: dict) -> tuple[int, str, str]:
    """(k, rerank, fusion) of a search request, each checked; defaults from ``config`` (the hot settings)."""
    k = parse_k(params.get("k"), config)
    rerank = parse_choice(params.get("rerank"), RERANK_MODES, config["rerank"], "rerank")
    fusion = parse_choice(params.get("fusion"), FUSION_RULES, config["fusion"], "fusion")
    return k, rerank, fusion


def parse_json(body: bytes):
    """The JSON value of a request body; 400 if it does not parse."""
    try:
        return json.loads(body)
    except RecursionError:
        raise ApiError(400, "invalid_json", "the JSON body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {err}") from None


def parse_filter(params: dict):
    """The serving.index.items.ItemFilter of a request's ``bbox`` and ``datetime`` (None without either); 422 if bad.
    ``intersects`` (a GeoJSON geometry) comes only from the STAC API's item search, which has checked it."""
    from serving.index.items import FilterError, ItemFilter

    try:
        return ItemFilter.parse(params.get("bbox"), params.get("datetime"), params.get("intersects"))
    except FilterError as err:
        raise ApiError(422, f"invalid_{err.field}", str(err)) from None



def check_query(query: str, config: dict) -> str:
    if not query.strip():
        raise ApiError(422, "empty_query", "query is empty or only whitespace")
    if len(query) > config["max_query_chars"]:
        raise ApiError(422, "query_too_long", f"query has {len(query)} characters; the limit is "
                                              f"{config['max_query_chars']}")
    return query



def check_size(size: int, limit: int) -> None:
    if size > limit:
        raise ApiError(413, "payload_too_large", f"the image is {size} bytes; the limit is {limit}")


def base64_limit(limit: int) -> int:
    return limit * 4 // 3 + 4096  # base64 grows data by 4/3; room for the other fields


def decode_base64(text: str | None, limit: int) -> bytes:
    if not text:
        raise ApiError(422, "missing_image", 'the JSON body needs "image_base64" (or "image_id" for captions)')
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ApiError(422, "invalid_image", f"image_base64 is not valid base64: {err}") from None
    check_size(len(data), limit)
    return data



# --- decoding images (off the event loop) ------------------------------------------------------------


def decode_image(data: bytes, size: int, max_pixels: int) -> np.ndarray:
    """Uploaded bytes -> RGB uint8 (size, size, 3), refusing bombs before decoding and broken data after.

    Only ``IMAGE_FORMATS`` are opened. Blocking (CPU-bound): call it through ``decode_in_pool``.
    """
    from serving.model.encoders import decode_and_resize

    if not data:
        raise ApiError(422, "invalid_image", "the image is empty")
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:  # reads the header only
            width, height = image.size
            if width * height > max_pixels:
                raise ApiError(413, "image_too_large", f"image is {width}x{height} = {width * height} pixels; the "
                                                       f"limit is {max_pixels} (decompression-bomb guard)")
            return decode_and_resize(image, size)  # decodes fully: truncated data fails here
    except ApiError:
        raise
    except Image.DecompressionBombError as err:
        raise ApiError(413, "image_too_large", f"image refused as a decompression bomb: {err}") from None
    except Exception as err:  # PIL raises many kinds for data that is not an image, or a broken one
        raise ApiError(422, "invalid_image", f"cannot decode the image as one of {'/'.join(IMAGE_FORMATS)}: "
                                             f"{err}") from None



def check_filterable(index: dict, where) -> None:
    """422 for a bbox filter on an index without footprints, or a datetime filter on one without times:
    such a filter could only answer nothing, which is more likely a mistake than a question."""
    counts = index.get("filterable") or {}
    if where is not None and where.bbox is not None and not counts.get("bbox"):
        raise ApiError(422, "no_footprints", "no item of this index has a footprint to filter by bbox (index "
                                             "GeoTIFFs, or give a sidecar or STAC catalog with bbox)")
    if where is not None and where.interval is not None and not counts.get("datetime"):
        raise ApiError(422, "no_times", "no item of this index has an acquisition time to filter by datetime "
                                        "(give a sidecar or STAC catalog with datetime)")
