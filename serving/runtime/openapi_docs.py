"""What ``/openapi.json`` tells a client beyond the routes: per endpoint the permission it needs and the roles that
hold it, an example answer, the errors it can answer (status, stable code, headers) and the headers it reads and
sends. ``install(api)`` makes the app's document carry them; docs/api.md is rendered from that document
(serving/runtime/reference.py).

Every route has one ``EndpointDoc`` in ``DOCS``, keyed by ``"METHOD /path"`` as the OpenAPI document writes the
path (``/v1/search/similar/{image_id}``, not FastAPI's ``{image_id:path}``); ``undocumented`` lists the routes
without one, and a test keeps that list empty. To document a new route: add its endpoint name and permission to
serving.governance.roles.ENDPOINTS (the name the route passes to ``Router._timed``), its entry to ``DOCS`` (a
small example answer shaped as the code answers, the error codes it adds to the common ones), any new error code
to ``ERRORS``, then regenerate docs/api.md (``REGENERATE``). The request bodies stay where they are validated
(serving/runtime/api.py, declared through each route's ``openapi_extra``).

Extensions: ``x-terrahash-endpoint`` (the name in audit entries and metrics), ``x-terrahash-permission`` (null: open
to anyone), ``x-terrahash-roles`` (the roles that hold it), ``x-terrahash-error-codes`` (per error response) and, at
the top, ``x-terrahash-errors`` (every error code: its status and when it is answered).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

from serving.governance.roles import ANONYMOUS, ENDPOINTS, ROLES

REGENERATE = "python -m serving.runtime.reference --out docs/api.md"
SECURITY_SCHEME = "bearerAuth"
ERROR_SCHEMA = "Error"

# Every error code the API answers: (HTTP status, when). The body is {"error": {"code", "message"}}.
ERRORS: dict[str, tuple[int, str]] = {
    # the request as a whole
    "invalid_json": (400, "the body is not JSON, not an object, or nested too deeply"),
    "invalid_form": (400, "the multipart form cannot be parsed"),
    "missing_key": (401, "auth is on and there is no Authorization header"),
    "invalid_key": (401, "the Authorization header is not 'Bearer KEY', or the key is unknown or revoked"),
    "forbidden": (403, "the key's role lacks the permission the endpoint (or X-TerraHash-Arm, or a STAC answer "
                       "for a coarsened role) needs"),
    "denied_by_policy": (403, "a policy rule denies this query for the key's role (the message names the rule)"),
    "not_found": (404, "no such path"),
    "method_not_allowed": (405, "the path exists, the method does not"),
    "payload_too_large": (413, "the body or the image is over max_upload_bytes"),
    "image_too_large": (413, "the image has more pixels than max_image_pixels (decompression-bomb guard)"),
    "unsupported_media_type": (415, "the Content-Type is not one the endpoint reads"),
    "invalid_request": (422, "a value has the wrong type or form"),
    "unknown_field": (422, "the body has a field the endpoint does not know"),
    "rate_limited": (429, "the key is over its request rate; Retry-After says when to try again"),
    "internal_error": (500, "the server failed; the body carries request_id for the replica's log"),
    "overloaded": (503, "this replica has max_inflight requests in flight; Retry-After: 1"),
    "keys_unavailable": (503, "the key file has not been read yet"),
    "audit_unavailable": (503, "the audit trail cannot record the request (audit.on_failure: closed)"),
    "deadline_exceeded": (504, "the request did not finish within deadline_s"),
    # searches and arms
    "unknown_arm": (422, "X-TerraHash-Arm names no arm"),
    "arm_not_ready": (503, "the arm's model or index is still loading, or failed to"),
    "encoder_unavailable": (503, "the arm's query encoder did not answer within the retries"),
    "shard_unavailable": (503, "a shard group did not answer within the retries"),
    "shard_not_ready": (503, "no replica of a shard group holds a verified copy yet"),
    "k_out_of_range": (422, "k is not an integer from 1 to max_k"),
    "invalid_rerank": (422, "rerank is not none, asymmetric or fusion (fusion needs a caption index)"),
    "invalid_fusion": (422, "fusion is not average or max"),
    "invalid_format": (422, "format is not json or stac"),
    "invalid_bbox": (422, "bbox is not west,south,east,north in WGS84 degrees"),
    "invalid_datetime": (422, "datetime is not an RFC 3339 instant, a date or an interval A/B"),
    "no_footprints": (422, "a bbox filter on an index whose items have no footprint"),
    "no_times": (422, "a datetime filter on an index whose items have no acquisition time"),
    "missing_query": (422, "the body has no query"),
    "invalid_query": (422, "query is not a string (explain: not exactly one of query, image_base64, image_id)"),
    "empty_query": (422, "query is empty or only whitespace"),
    "query_too_long": (422, "query is over max_query_chars characters"),
    "missing_image": (422, "no image: no image_base64 field, or no file field named image"),
    "invalid_image": (422, "the image is empty, not base64, or not a JPEG, PNG, TIFF or WebP that decodes"),
    "invalid_image_id": (422, "image_id is not a string"),
    "unknown_id": (404, "no indexed image has this id"),
    "no_caption_index": (404, "the deployment has no caption index"),
    "limit_out_of_range": (422, "limit is not from 1 to max_k"),
    "invalid_token": (422, "token is not a string"),
    "missing_result_id": (422, "the body has no result_id"),
    "invalid_result_id": (422, "result_id is not a string"),
    "invalid_grid": (422, "grid is not an integer from 2 to 8"),
    "source_unreadable": (502, "the image of the item cannot be read from the archive"),
    "not_configured": (404, "the deployment decodes no such radio link (a pixel link: no jscc_model; a learned code "
                            "link: no code_link_model)"),
    "invalid_link": (422, "link is not a code link's spec, or its channel uses cannot carry the served code"),
    "unknown_link": (404, "no learned codec for the link's channel uses, or not of its model_version"),
    "code_space_mismatch": (409, "the sender's code space (or the codec's) is not the served model's"),
    "code_link_unavailable": (503, "the deployment's code_link_model cannot be loaded"),
    "missing_symbols": (422, "the body has no symbols"),
    "invalid_symbols": (422, "symbols are not base64 complex64 values of the link's length, or not finite"),
    "missing_snr_db": (422, "the body has no snr_db"),
    "invalid_snr": (422, "snr_db is not a number from -30 to 30"),
    "missing_model_version": (422, "the body has no model_version"),
    "unknown_model_version": (404, "no served model version or arm by this name (received symbols: not of the "
                                   "served link's version, a 409)"),
    "invalid_model_version": (422, "model_version is not a string"),
    "invalid_hops": (422, "hops is not an integer from 1 to 8"),
    "invalid_source_hash": (422, "source_hash is not hex of the served code length"),
    "no_model_card": (404, "the served model version has no model card"),
    "no_keys": (404, "the deployment has no key file (auth is off)"),
    # the STAC API (a bad parameter is a 400 there, as the STAC API specifies)
    "unknown_collection": (404, "the STAC collection is not served (the served one is \"images\")"),
    "unknown_parameter": (400, "a STAC search parameter this endpoint does not take"),
    "invalid_ids": (400, "ids is not a non-empty list of strings, or lists more than max_k ids"),
    "invalid_collections": (400, "collections is not a non-empty list of strings"),
    "invalid_limit": (400, "limit is not a positive integer"),
    "invalid_q": (400, "q is not a non-empty string (POST: or an array of strings), or is over max_query_chars"),
}

# Codes shared by families of endpoints (added by EndpointDoc's flags, see ``error_codes``).
EVERY = ("internal_error", "deadline_exceeded")
GUARDED = ("missing_key", "invalid_key", "forbidden", "rate_limited", "keys_unavailable")  # a permission needed
ADMITTED = ("overloaded", "audit_unavailable")  # not the load balancers' probes
ON_ARM = ("unknown_arm", "forbidden", "arm_not_ready", "encoder_unavailable", "shard_unavailable", "shard_not_ready")
JSON_BODY = ("invalid_json", "payload_too_large", "unsupported_media_type", "invalid_request", "unknown_field")
FILTERS = ("invalid_bbox", "invalid_datetime", "no_footprints", "no_times")
OPTIONS = ("k_out_of_range", "invalid_rerank", "invalid_fusion", "invalid_format", *FILTERS, "denied_by_policy")
UPLOAD = ("invalid_form", "missing_image", "invalid_image", "image_too_large")


@dataclass(frozen=True)
class EndpointDoc:
    """What the OpenAPI document adds to one route."""

    endpoint: str  # its name in serving.governance.roles.ENDPOINTS, audit entries and metrics
    example: object  # a 200 answer as the code shapes it (small: two results, short strings)
    # the codes of ERRORS it answers besides the families its flags add; (status, code) where the status is not
    # the code's own in ERRORS
    errors: tuple = ()
    media_type: str = "application/json"  # of the 200 answer
    on_arm: bool = False  # answered by a traffic arm: X-Client-Id and X-TerraHash-Arm apply, and ON_ARM errors
    arm_header: bool = False  # the 200 answer carries X-TerraHash-Arm (searches answered in full)
    json_body: bool = False  # reads a size-limited JSON body: JSON_BODY errors
    notes: tuple[str, ...] = field(default=())  # other media types or answers, one line each

    def error_codes(self) -> dict[int, list[str]]:
        """Every error code of this endpoint by HTTP status (statuses ascending, codes in ERRORS' order)."""
        given = dict((code, ERRORS[code][0]) if isinstance(code, str) else (code[1], code[0]) for code in self.errors)
        families = [EVERY, GUARDED if ENDPOINTS[self.endpoint] is not None else (),
                    ADMITTED if self.endpoint not in ("healthz", "readyz") else (),
                    ON_ARM if self.on_arm else (), JSON_BODY if self.json_body else ()]
        for code in (c for family in families for c in family):
            given.setdefault(code, ERRORS[code][0])
        by_status: dict[int, list[str]] = {}
        for code in ERRORS:
            if code in given:
                by_status.setdefault(given[code], []).append(code)
        return dict(sorted(by_status.items()))


_HIT = {"id": "beach/beach42.tif", "image_id": "beach/beach42.tif", "distance": 3, "score": 0.906,
        "image": "beach/beach42.tif", "thumbnail": "/v1/items/beach/beach42.tif/thumbnail", "class": "beach"}
_HIT2 = {**_HIT, "id": "beach/beach07.tif", "image_id": "beach/beach07.tif", "distance": 5, "score": 0.844,
         "image": "beach/beach07.tif", "thumbnail": "/v1/items/beach/beach07.tif/thumbnail"}
_SERVED = {"arm": "champion", "model": "models:/terrahash-students/3", "model_version": "terrahash-students/3",
           "index_version": {"images": "v0002", "captions": "v0002"}, "release": "r0002"}
_TIMED = {"latency_ms": 9.412, "timings_ms": {"encode": 2.104, "search": 4.87, "merge": 0.311}}


def _search(query: dict, results: list, **extra) -> dict:
    return {"query": query, "k": 2, "rerank": "none", "results": results, **extra, **_SERVED, **_TIMED}


_CAPTION = {"id": "beach/beach42.tif#0", "image_id": "beach/beach42.tif", "distance": 4, "score": 0.875,
            "text": "a long white beach beside the blue sea", "image": "beach/beach42.tif"}
_ITEM = {"id": "survey/lonlat.tif?window=0,0,256,256", "image_id": "survey/lonlat.tif?window=0,0,256,256",
         "bbox": [-117.0, 33.9744, -116.9744, 34.0], "datetime": "2024-06-01T10:30:00Z",
         "properties": {"scene": "survey/lonlat.tif", "window": [0, 0, 256, 256]},
         "image": "survey/lonlat.tif?window=0,0,256,256",
         "thumbnail": "/v1/items/survey/lonlat.tif%3Fwindow%3D0%2C0%2C256%2C256/thumbnail"}
_ARM_STATUS = {"requests": 1830, "errors": 0, "error_rate": 0.0, "p50_ms": 8.2, "p99_ms": 21.4,
               "probe": {"count": 120, "errors": 0, "map_at_k": 0.71, "recall_at_k": 0.64, "p99_ms": 30.1},
               "fallbacks": 0, "share": 0.9, "weight": 90, "shadow": False, "alias": "champion",
               "verdict": {"verdict": "healthy", "reasons": []}, "rollback": None, "gates": None,
               "model": {"name": "terrahash-students", "version": "3"},
               "serving": {"model": "terrahash-students/3", "since": "2024-06-01T09:00:00Z", "replicas": 2,
                           "alias_problem": None},
               "rollout": None, "ready": True, "problem": None, **_SERVED}
_STAC_LINK = {"rel": "self", "href": "https://search.example.org/v1", "type": "application/json"}
_STAC_ITEM = {"type": "Feature", "stac_version": "1.1.0", "id": "survey/lonlat.tif?window=0,0,256,256",
              "collection": "images", "bbox": [-117.0, 33.9744, -116.9744, 34.0],
              "geometry": {"type": "Polygon", "coordinates": [[[-117.0, 33.9744], [-116.9744, 33.9744],
                                                               [-116.9744, 34.0], [-117.0, 34.0], [-117.0, 33.9744]]]},
              "properties": {"datetime": "2024-06-01T10:30:00Z", "terrahash:distance": 3},
              "assets": {"thumbnail": {"href": "https://search.example.org/v1/items/survey/lonlat.tif%3Fwindow"
                                               "%3D0%2C0%2C256%2C256/thumbnail", "type": "image/jpeg"}},
              "links": [{"rel": "collection", "href": "https://search.example.org/v1/collections/images"}]}
_STAC_PAGE = {"type": "FeatureCollection", "features": [_STAC_ITEM], "numberReturned": 1,
              "links": [{"rel": "next", "href": "https://search.example.org/v1/search?limit=1&token=2",
                         "type": "application/geo+json"}]}
_COLLECTION = {"type": "Collection", "stac_version": "1.1.0", "id": "images", "title": "Indexed images",
               "extent": {"spatial": {"bbox": [[-117.0, 33.95, -116.94, 34.0]]},
                          "temporal": {"interval": [["2024-06-01T10:30:00Z", "2024-06-01T10:30:00Z"]]}},
               "license": "other", "links": [{"rel": "items", "href": "https://search.example.org/v1/collections/"
                                                                     "images/items", "type": "application/geo+json"}]}
# a bad STAC parameter is a 400 (codes whose status elsewhere is 422 are given with theirs here)
_STAC_SEARCH = ("unknown_collection", "unknown_parameter", "invalid_ids", "invalid_collections", "invalid_limit",
                "invalid_q", *((400, code) for code in ("invalid_bbox", "invalid_datetime", "invalid_token")),
                "denied_by_policy")

DOCS: dict[str, EndpointDoc] = {
    "GET /v1/healthz": EndpointDoc("healthz", {"status": "ok"}),
    "GET /v1/readyz": EndpointDoc(
        "readyz", {"ready": True, "degraded": False, "primary": "champion", "model_version": "terrahash-students/3",
                   "index_version": {"images": "v0002", "captions": "v0002"},
                   "shards": [{"shard": "images-shard-00000-00002", "ready": True, "replicas": 1,
                               "ready_replicas": 1, "rows": 1050, "problem": None}],
                   "arms": {"champion": {"ready": True, "problem": None, "weight": 1.0, "shadow": False}},
                   "replicas": [], "replaced": []},
        notes=("503 with the same body and \"ready\": false while a live arm or a shard is not ready.",
               "Without permission `ready_details` (auth on) the body is only {\"ready\": true|false}.")),
    "GET /v1/traffic": EndpointDoc(
        "traffic", {"window_s": 60, "arms": {"champion": _ARM_STATUS},
                    "probes": {"source": "/data/ucm_captions", "count": 40, "problem": None, "k": 10},
                    "primary": "champion", "salt": "terrahash"},
        notes=("One entry per arm (champion, challenger, shadows); an arm given by alias shows the version it "
               "serves and since when, and a roll-out in progress.",)),
    "GET /v1/keys": EndpointDoc(
        "keys", {"keys": [{"name": "field-app", "role": "reader", "id": "k_3f9a2c", "created": "2024-06-01T09:00:00Z",
                           "revoked": None, "rate": None, "burst": None}]}, errors=("no_keys",)),
    "POST /v1/search/text": EndpointDoc(
        "text", _search({"text": "a beach with white waves"}, [_HIT, _HIT2]),
        errors=(*OPTIONS, "missing_query", "invalid_query", "empty_query", "query_too_long"), on_arm=True,
        arm_header=True, json_body=True,
        notes=("format \"stac\" (or Accept: application/geo+json): the results as a STAC ItemCollection.",)),
    "POST /v1/search/image": EndpointDoc(
        "image", _search({"image": "upload"}, [_HIT, _HIT2]), errors=(*OPTIONS, *UPLOAD), on_arm=True,
        arm_header=True, json_body=True,
        notes=("format \"stac\" (or Accept: application/geo+json): the results as a STAC ItemCollection.",)),
    "POST /v1/search/received": EndpointDoc(
        "received", _search({"image": "received"}, [_HIT], received={
            "model_version": "jscc-2hop-1a2b3c", "snr_db": -5.0, "snr_db_received": -5.0, "hops_received": 2,
            "bit_agreement": 0.94}),
        errors=("not_configured", "k_out_of_range", "missing_symbols", "invalid_symbols", "missing_snr_db",
                "invalid_snr", "missing_model_version", "invalid_model_version",
                (409, "unknown_model_version"), "invalid_hops", "invalid_source_hash", "invalid_link", "unknown_link", "code_space_mismatch", "code_link_unavailable", "invalid_rerank",
                "denied_by_policy"),
        on_arm=True, arm_header=True, json_body=True,
        notes=("A pixel link's symbols (`model_version` names the decoder of `jscc_model`) are decoded to an image "
               "and searched like an upload; a code link's (`link`: scheme `repetition` on BPSK or QPSK, or "
               "`learned`, a codec of `code_link_model`) are decoded to the hash code and searched; `received` "
               "then names the scheme, channel uses and code space.",)),
    "GET /v1/search/similar/{image_id}": EndpointDoc(
        "similar", _search({"image_id": "beach/beach01.tif"}, [_HIT, _HIT2]),
        errors=("unknown_id", "k_out_of_range", "invalid_format", *FILTERS, "denied_by_policy"), on_arm=True,
        arm_header=True),
    "POST /v1/captions": EndpointDoc(
        "captions", {"query": {"image_id": "beach/beach42.tif"}, "k": 2, "results": [_CAPTION], **_SERVED,
                     **_TIMED},
        errors=("unknown_id", "no_caption_index", "k_out_of_range", *FILTERS, *UPLOAD, "invalid_image_id",
                "denied_by_policy"), on_arm=True, arm_header=True, json_body=True),
    "POST /v1/search/items": EndpointDoc(
        "items", {"query": {"bbox": [-117.3, 33.8, -116.9, 34.1], "datetime": "2024-06-01/2024-06-08"},
                  "limit": 1, "matched": 12, "results": [_ITEM], "next": _ITEM["id"], **_SERVED, **_TIMED},
        errors=("limit_out_of_range", "invalid_token", "invalid_format", *FILTERS, "denied_by_policy"),
        on_arm=True, arm_header=True, json_body=True,
        notes=("format \"stac\" (or Accept: application/geo+json): the page as a STAC ItemCollection.",)),
    "GET /v1/items/{item_id}/thumbnail": EndpointDoc(
        "thumbnail", "(JPEG bytes, 128 pixels on the long side; Cache-Control: public, max-age=86400)",
        errors=("unknown_id", "arm_not_ready", "source_unreadable"), media_type="image/jpeg"),
    "POST /v1/explain": EndpointDoc(
        "explain", {"query": {"query": "a beach"}, "result_id": "beach/beach42.tif",
                    "occlusion": {"grid": 2, "hamming_distance": 9, "hamming_change": [[2, 0], [1, 3]],
                                  "distance_change": [[0.04, 0.0], [0.02, 0.07]], "strongest_cell": [1, 1]},
                    "overlay_png_base64": "iVBORw0KGgo...", "words": [{"word": "beach", "bits_flipped": 3}],
                    **_SERVED, **_TIMED},
        errors=("unknown_id", "missing_result_id", "invalid_result_id", "invalid_query", "empty_query",
                "query_too_long", "missing_image", "invalid_image", "invalid_image_id", "invalid_grid",
                "source_unreadable"),
        on_arm=True, arm_header=True, json_body=True),
    "GET /v1/models/{version}/card": EndpointDoc(
        "card", {"model": {"name": "terrahash-students", "version": "3", "uri": "models:/terrahash-students/3",
                           "bits": 64},
                 "data": {"dataset": "ucm_captions", "classes": ["agricultural", "airplane", "..."]},
                 "figures": {"split": "test", "models": {"fp32": {"image_to_image": {"map_all": 0.69},
                                                                  "text_to_image": {"map_all": 0.58}, "mr": 61.2}}},
                 "energy": {"training": {"energy_kwh": 0.42}, "distillation": {"energy_kwh": 0.05}},
                 "intended_use": "...", "limitations": ["..."]},
        errors=("unknown_model_version", "no_model_card"),
        notes=("Accept: text/markdown: the card as Markdown.",)),
    # STAC API (serving/runtime/stac_api.py, stac_views.py)
    "GET /v1": EndpointDoc(
        "stac_landing", {"type": "Catalog", "stac_version": "1.1.0", "id": "terrahash", "title": "TerraHash",
                         "conformsTo": ["https://api.stacspec.org/v1.0.0/core", "..."],
                         "links": [_STAC_LINK, {"rel": "search", "href": "https://search.example.org/v1/search",
                                                "type": "application/geo+json", "method": "GET"}]}),
    "GET /v1/conformance": EndpointDoc(
        "stac_conformance", {"conformsTo": ["https://api.stacspec.org/v1.0.0/core",
                                            "https://api.stacspec.org/v1.0.0/item-search"]}),
    "GET /v1/collections": EndpointDoc(
        "stac_collections", {"collections": [_COLLECTION], "numberMatched": 1, "numberReturned": 1,
                             "links": [_STAC_LINK]}, errors=("arm_not_ready",)),
    "GET /v1/collections/{collection_id}": EndpointDoc(
        "stac_collections", _COLLECTION, errors=("unknown_collection", "arm_not_ready")),
    "GET /v1/collections/{collection_id}/items": EndpointDoc(
        "stac_items", _STAC_PAGE, errors=_STAC_SEARCH, media_type="application/geo+json", on_arm=True),
    "GET /v1/collections/{collection_id}/items/{item_id}": EndpointDoc(
        "stac_item", _STAC_ITEM, errors=("unknown_collection", "unknown_id", "arm_not_ready"),
        media_type="application/geo+json"),
    "GET /v1/search": EndpointDoc(
        "stac_search", _STAC_PAGE, errors=_STAC_SEARCH, media_type="application/geo+json", on_arm=True),
    "POST /v1/search": EndpointDoc(
        "stac_search", _STAC_PAGE, errors=_STAC_SEARCH, media_type="application/geo+json", on_arm=True,
        json_body=True),
}

_STATUS_NAMES = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 409: "Conflict",
                 413: "Payload Too Large",
                 415: "Unsupported Media Type", 422: "Unprocessable Content", 429: "Too Many Requests",
                 500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}
_ROLES_ORDER = list(ROLES)


def roles_holding(permission: str | None) -> list[str]:
    """The roles whose keys may use an endpoint needing ``permission`` (None: anyone, with a key or not)."""
    if permission is None:
        return [ANONYMOUS, *_ROLES_ORDER]
    return [role for role in _ROLES_ORDER if permission in ROLES[role]]


def _header(description: str, schema_type: str = "string") -> dict:
    return {"description": description, "schema": {"type": schema_type}}


REQUEST_HEADERS = [
    {"name": "X-Client-Id", "in": "header", "required": False,
     "description": "a stable id of the end user or device: its requests stay on one traffic arm (sticky)",
     "schema": {"type": "string"}},
    {"name": "X-TerraHash-Arm", "in": "header", "required": False,
     "description": "answer from this traffic arm (needs permission arm_override: operator, admin)",
     "schema": {"type": "string"}},
]


def _error_response(status: int, codes: list[str]) -> dict:
    example = {"error": {"code": codes[0], "message": ERRORS[codes[0]][1]}}
    if status == 500:
        example["error"]["request_id"] = "b1946ac9-2c1f-4f0e-9e2a-6d4f3b2a1c0e"
    response = {"description": f"{_STATUS_NAMES[status]}: " + "; ".join(f"{c}: {ERRORS[c][1]}" for c in codes),
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ERROR_SCHEMA}"},
                                                 "example": example}},
                "x-terrahash-error-codes": codes}
    headers = {}
    if status == 401:
        headers["WWW-Authenticate"] = _header('Bearer realm="terrahash"')
    if "rate_limited" in codes or "overloaded" in codes:
        headers["Retry-After"] = _header("seconds to wait before trying again (429; 503 overloaded)", "integer")
    if headers:
        response["headers"] = headers
    return response


def _responses(doc: EndpointDoc, described: str) -> dict:
    ok = {"description": described, "content": {doc.media_type: {"example": doc.example}}}
    if doc.arm_header:
        ok["headers"] = {"X-TerraHash-Arm": _header("the traffic arm that answered (also \"arm\" in the body)")}
    responses = {"200": ok}
    for status, codes in doc.error_codes().items():
        responses[str(status)] = _error_response(status, codes)
    return responses


def _document_operation(operation: dict, doc: EndpointDoc) -> None:
    permission = ENDPOINTS[doc.endpoint]
    operation["x-terrahash-endpoint"] = doc.endpoint
    operation["x-terrahash-permission"] = permission
    operation["x-terrahash-roles"] = roles_holding(permission)
    operation["security"] = [{SECURITY_SCHEME: []}] if permission else [{}, {SECURITY_SCHEME: []}]
    if doc.on_arm:
        operation["parameters"] = [*operation.get("parameters", []), *REQUEST_HEADERS]
    ok = " ".join(("The answer.", *doc.notes))
    operation["responses"] = _responses(doc, ok)


ERROR_BODY = {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["code", "message"], "properties": {
        "code": {"type": "string", "description": "stable, machine-readable (x-terrahash-errors lists them)"},
        "message": {"type": "string", "description": "for people: what was wrong and what is accepted"},
        "request_id": {"type": "string", "description": "500 only: quote it when reporting the failure"}}}}}

BEARER = {"type": "http", "scheme": "bearer",
          "description": "An API key, when the deployment has auth on: 'Authorization: Bearer KEY' "
                         "(keys and their roles: `terrahash keys`). Without auth every request may use every "
                         "endpoint."}


def operations(schema: dict):
    """("METHOD /path", operation) of every operation of an OpenAPI document."""
    for path, methods in schema.get("paths", {}).items():
        for method, operation in methods.items():
            if method in ("get", "post", "put", "patch", "delete"):
                yield f"{method.upper()} {path}", operation


def undocumented(schema: dict) -> list[str]:
    """The operations of ``schema`` without an entry in DOCS."""
    return [key for key, _ in operations(schema) if key not in DOCS]


def documented(schema: dict) -> dict:
    """A copy of the app's OpenAPI document with DOCS applied (routes without docs are left as they are)."""
    schema = copy.deepcopy(schema)
    for key, operation in operations(schema):
        if key in DOCS:
            _document_operation(operation, DOCS[key])
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):  # FastAPI's 422 body: the app answers ERROR_BODY
        schemas.pop(name, None)
    schemas[ERROR_SCHEMA] = ERROR_BODY
    components["securitySchemes"] = {SECURITY_SCHEME: BEARER}
    statuses: dict[str, set[int]] = {}
    for _, operation in operations(schema):
        for status, response in operation.get("responses", {}).items():
            for code in response.get("x-terrahash-error-codes", ()):
                statuses.setdefault(code, set()).add(int(status))
    schema["x-terrahash-errors"] = {code: {"statuses": sorted(statuses[code]), "when": when}
                                    for code, (_, when) in ERRORS.items() if code in statuses}
    return schema


def install(app) -> None:
    """Make ``app.openapi()`` (what ``/openapi.json`` and ``/docs`` serve) the documented document, built once."""
    from fastapi import FastAPI

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = documented(FastAPI.openapi(app))
        return app.openapi_schema

    app.openapi = openapi
