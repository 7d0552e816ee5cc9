"""STAC API documents and parameters: the landing page, conformance, collections, search parameters, pages.

TerraHash answers STAC API 1.0 (core, collections, features, item search) under ``/v1``, plus the free-text
extension's ``q`` on item search. The served image index is one collection, ``COLLECTION`` (the index's own
collection name); its extent is that of its items' footprints and times, else the whole world and an open
interval. Without ``q`` a search lists the matching items in id order (serving.runtime.views'
``/v1/search/items``); with ``q`` it is TerraHash's ranked text search (``/v1/search/text``), rank order, at
most ``max_k`` results, ``q``'s terms (GET: the string; POST: a string, or an array joined with ", ") read
as one text. ``intersects`` (a GeoJSON geometry; GET: its JSON text) filters by place instead of ``bbox``:
its bounding box is the bbox filter and the items passing that are tested exactly against the geometry
inside the filter itself (serving.index.items.ItemFilter), before any page is cut. A page's ``next`` link
carries a ``token``: the last id listed, or with ``q`` the rank reached.
``limit`` above ``max_k`` is capped (as OGC API Features asks); every bad value is a 400. Plain functions
over dicts: the handlers are serving.runtime.stac_views.StacViews.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from urllib.parse import quote, urlencode

from serving.index.items import FilterError, ItemFilter, rfc3339
from serving.runtime.checks import ApiError
from serving.runtime.stac import STAC_VERSION, item_collection, stac_item

COLLECTION = "images"  # the image index's collection name (index/images/vNNNN): the STAC collection id
STAC_API = "https://api.stacspec.org/v1.0.0"
FREE_TEXT = "https://api.stacspec.org/v1.0.0-rc.1/item-search#free-text"  # the extension's own URI
OGC_FEATURES = "http://www.opengis.net/spec/ogcapi-features-1/1.0/conf"
CONFORMANCE = (f"{STAC_API}/core", f"{STAC_API}/collections", f"{STAC_API}/ogcapi-features",
               f"{STAC_API}/item-search", FREE_TEXT, f"{OGC_FEATURES}/core", f"{OGC_FEATURES}/oas30",
               f"{OGC_FEATURES}/geojson")
JSON, GEOJSON = "application/json", "application/geo+json"
OPENAPI_JSON = JSON  # what FastAPI's /openapi.json answers (a validator checks the link's type against it)
WORLD = [-180.0, -90.0, 180.0, 90.0]
SEARCH_FIELDS = ("bbox", "intersects", "datetime", "ids", "collections", "limit", "q", "token")
RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")
ITEMS_FIELDS = ("bbox", "datetime", "collections", "limit", "token")  # /collections/{id}/items (pystac-client
# sends its collection id there too)


_DESCRIBED = {"bbox": ("string", "west,south,east,north in WGS84 degrees (POST: an array)"),
              "intersects": ("string", "a GeoJSON geometry in WGS84 (Point, MultiPoint, LineString, MultiLineString, "
                                       "Polygon, MultiPolygon, GeometryCollection): the items whose footprint it "
                                       "meets; not with bbox (GET: the geometry's JSON text; POST: an object)"),
              "datetime": ("string", "an RFC 3339 instant, a date, or an interval A/B with '..' for an open end"),
              "ids": ("string", "item ids, comma-separated (POST: an array)"),
              "collections": ("string", f"collection ids, comma-separated (POST: an array); served: {COLLECTION}"),
              "limit": ("integer", "items per page (capped at the deployment's max_k)"),
              "q": ("string", "free text: the items ranked by TerraHash's text search (POST: or an array of terms)"),
              "token": ("string", "the token of the previous page's next link")}


def openapi_query(fields: tuple[str, ...]) -> dict:
    """``openapi_extra`` declaring the GET parameters ``fields``."""
    return {"parameters": [{"name": f, "in": "query", "required": False, "description": _DESCRIBED[f][1],
                            "schema": {"type": _DESCRIBED[f][0], **({"minimum": 1} if f == "limit" else {})}}
                           for f in fields]}


def openapi_body(fields: tuple[str, ...]) -> dict:
    """``openapi_extra`` declaring a POST body of ``fields``."""
    array = {"type": "array", "items": {"type": "string"}}
    types = {"bbox": {"type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 6},
             "intersects": {"type": "object", "required": ["type"], "properties": {"type": {"type": "string"}}},
             "ids": array, "collections": array, "limit": {"type": "integer", "minimum": 1}}
    properties = {f: {**types.get(f, {"type": "string"}), "description": _DESCRIBED[f][1]} for f in fields}
    schema = {"type": "object", "additionalProperties": False, "properties": properties}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _link(rel: str, href: str, media: str = JSON, **extra) -> dict:
    return {"rel": rel, "href": href, "type": media, **extra}


def landing_page(base: str, title: str) -> dict:
    """``GET /v1``: a STAC Catalog with ``conformsTo`` and the links a STAC client starts from."""
    root = f"{base}/v1"
    return {"type": "Catalog", "stac_version": STAC_VERSION, "id": "terrahash", "title": title,
            "description": "Remote sensing images found by text (free-text q, ranked by binary hash codes), "
                           "place and time.", "conformsTo": list(CONFORMANCE),
            "links": [_link("self", root), _link("root", root), _link("conformance", f"{root}/conformance"),
                      _link("data", f"{root}/collections"),
                      _link("child", f"{root}/collections/{COLLECTION}", title="the served image index"),
                      _link("search", f"{root}/search", GEOJSON, method="GET"),
                      _link("search", f"{root}/search", GEOJSON, method="POST"),
                      _link("service-desc", f"{base}/openapi.json", OPENAPI_JSON),
                      _link("service-doc", f"{base}/docs", "text/html")]}


def conformance() -> dict:
    return {"conformsTo": list(CONFORMANCE)}


def merge_extents(parts: list[dict]) -> dict:
    """One extent from serving.index.items.extent's of every shard (None where no shard has one)."""
    boxes = [p["bbox"] for p in parts if p.get("bbox")]
    times = [p["interval"] for p in parts if p.get("interval")]
    return {"bbox": [min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes),
                     max(b[3] for b in boxes)] if boxes else None,
            "interval": [min(t[0] for t in times), max(t[1] for t in times)] if times else None}


def collection_document(base: str, extent: dict, served: dict) -> dict:
    """A STAC 1.1 Collection of the served image index; ``served``: the arm's versions (arm.versions())."""
    root, here = f"{base}/v1", f"{base}/v1/collections/{COLLECTION}"
    interval = [rfc3339(t) for t in extent["interval"]] if extent["interval"] else [None, None]
    return {"type": "Collection", "stac_version": STAC_VERSION, "stac_extensions": [], "id": COLLECTION,
            "title": "Indexed images",
            "description": "The images of the served index, searchable by text (q), place (bbox) and time "
                           f"(datetime). Model {served.get('model')}, index release {served.get('release')}.",
            "license": "other", "keywords": ["remote sensing", "image retrieval", "hashing"],
            "extent": {"spatial": {"bbox": [extent["bbox"] or WORLD]}, "temporal": {"interval": [interval]}},
            "summaries": {"terrahash:model_version": [served.get("model_version")]},
            "links": [_link("self", here), _link("root", root), _link("parent", root),
                      _link("items", f"{here}/items", GEOJSON)]}


def collections_document(base: str, collections: list[dict]) -> dict:
    return {"collections": collections, "numberMatched": len(collections), "numberReturned": len(collections),
            "links": [_link("self", f"{base}/v1/collections"), _link("root", f"{base}/v1")]}


def check_collection(collection_id: str) -> None:
    if collection_id != COLLECTION:
        raise ApiError(404, "unknown_collection", f"no collection {collection_id!r}; served: [{COLLECTION!r}]")


# --- parameters ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StacSearch:
    """One search's checked parameters (``given``: as the client sent them, re-sent by ``next`` links)."""

    limit: int
    where: ItemFilter | None = None
    ids: tuple[str, ...] | None = None
    collections: tuple[str, ...] | None = None
    q: str | None = None
    token: str | None = None
    given: tuple = ()

    def filters(self) -> dict:
        """bbox, intersects and datetime as the service's own endpoints take them (serving.runtime.api's
        parse_filter)."""
        given = dict(self.given)
        return {"bbox": given.get("bbox"), "intersects": given.get("intersects"), "datetime": given.get("datetime")}

    def offset(self, max_k: int) -> int:
        """With ``q``: the rank the page starts after (its token), 0 without one."""
        if self.token is None:
            return 0
        if not (self.token.isascii() and self.token.isdigit() and int(self.token) < max_k):
            raise ApiError(400, "invalid_token", f"token {self.token!r} is not a token of this search")
        return int(self.token)


def _bad(field: str, message: str) -> ApiError:
    return ApiError(400, f"invalid_{field}", message)


def _strings(value, field: str) -> tuple[str, ...]:
    """A GET parameter's comma-separated strings, or a JSON array of strings."""
    if isinstance(value, str):
        value = [v for v in value.split(",") if v]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise _bad(field, f"{field} must be a non-empty list of strings (GET: comma-separated)")
    return tuple(value)


def _limit(value, default: int, max_k: int) -> int:
    if value is None:
        return default
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _bad("limit", f"limit must be a positive integer, got {value!r}")
    return min(value, max_k)  # above the maximum: the maximum (OGC API Features)


def _bbox(value):
    """``value`` checked; a 3D box's horizontal part."""
    if isinstance(value, str):
        value = value.split(",")
    if isinstance(value, list) and len(value) == 6:
        value = [value[0], value[1], value[3], value[4]]
    return value


def _geometry(value, get: bool) -> dict:
    """``intersects`` as a JSON object: a GET parameter's JSON text read, a POST body's object as it is (the
    geometry itself is checked by ItemFilter.parse)."""
    if get and isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise _bad("intersects", f"intersects must be a GeoJSON geometry as JSON text, "
                                     f"got {value[:80]!r}") from None
    if not isinstance(value, dict):
        raise _bad("intersects", "intersects must be a GeoJSON geometry object"
                                 + ("" if get else " (a POST body's is an object, not JSON text)"))
    return value


def _text(value, config: dict) -> str:
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        value = ", ".join(value)  # the extension's POST form: an array of terms
    if not isinstance(value, str) or not value.strip():
        raise _bad("q", "q must be a non-empty string (POST: or an array of strings)")
    if len(value) > config["max_query_chars"]:
        raise _bad("q", f"q has {len(value)} characters; the limit is {config['max_query_chars']}")
    return value


def _instants(value) -> None:
    """400 unless ``value`` is an RFC 3339 date-time or an interval of them (STAC API is stricter than the
    service's own endpoints, which also take dates)."""
    if not isinstance(value, str):
        return  # ItemFilter.parse refuses it
    ends = value.split("/")
    if len(ends) > 2 or not all(e in ("", "..") or RFC3339.match(e) for e in ends):
        raise _bad("datetime", f"datetime must be an RFC 3339 date-time (2024-06-01T10:30:00Z) or an interval "
                               f"A/B of them, '..' an open end; got {value!r}")


def parse_search(values, config: dict, fields: tuple[str, ...] = SEARCH_FIELDS, get: bool = True) -> StacSearch:
    """The checked parameters of a GET query string (a dict of strings; ``get``) or a POST body (arrays as
    JSON arrays); 400 for a bad or unknown one. ``limit`` defaults to ``default_k`` with ``q`` (as
    /v1/search/text's k), else to the item listing's page (10 x default_k), and is capped at ``max_k``."""
    if not isinstance(values, dict):
        raise ApiError(400, "invalid_json", "the body must be a JSON object")
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ApiError(400, "unknown_parameter", f"unknown parameter(s) {unknown}; this endpoint takes {list(fields)}")
    given = {k: v for k, v in values.items() if v is not None and v != ""}
    if not get and isinstance(given.get("bbox"), str):
        raise _bad("bbox", "a POST body's bbox is an array of numbers")
    if "bbox" in given:
        given["bbox"] = _bbox(given["bbox"])
    if "intersects" in given:
        given["intersects"] = _geometry(given["intersects"], get)
    if "datetime" in given:
        _instants(given["datetime"])
    try:
        where = ItemFilter.parse(given.get("bbox"), given.get("datetime"), given.get("intersects"))
    except FilterError as err:
        raise _bad(err.field, str(err)) from None
    if "bbox" in given and where is not None and where.bbox is not None:
        given["bbox"] = list(where.bbox)
    q = _text(given["q"], config) if "q" in given else None
    listing = min(10 * config["default_k"], config["max_k"])
    limit = _limit(given.get("limit"), config["default_k"] if q is not None else listing, config["max_k"])
    if "limit" in given:
        given["limit"] = limit
    if "token" in given and not isinstance(given["token"], str):
        raise _bad("token", "token must be a string (the next link's)")
    ids, collections = (_strings(given[f], f) if f in given else None for f in ("ids", "collections"))
    if ids is not None and len(ids) > config["max_k"]:
        raise _bad("ids", f"at most {config['max_k']} ids per search, got {len(ids)}")
    for name, value in (("ids", ids), ("collections", collections)):
        if value is not None:
            given[name] = list(value)
    given.pop("token", None)
    return StacSearch(limit, where, ids, collections, q, values.get("token") or None,
                      tuple(sorted(given.items())))


# --- pages --------------------------------------------------------------------------------------------


def item_links(item: dict, base: str) -> dict:
    """A STAC Item of the collection, with its collection and links (self, parent, collection, root)."""
    here = f"{base}/v1/collections/{COLLECTION}"
    item["collection"] = COLLECTION
    item["links"] = [_link("self", f"{here}/items/{quote(item['id'], safe='/,')}", GEOJSON),
                     _link("parent", here), _link("collection", here), _link("root", f"{base}/v1")]
    return item


def one_item(hit: dict, base: str) -> dict:
    return item_links(stac_item(hit, base), base)


def _query_string(params: dict) -> str:
    """A GET query string of checked parameters: arrays comma-separated, a geometry as its JSON text."""
    return urlencode({k: json.dumps(v, separators=(",", ":")) if isinstance(v, dict) else
                      ",".join(map(str, v)) if isinstance(v, (list, tuple)) else v for k, v in params.items()})


def page(answer: dict, base: str, path: str, search: StacSearch, method: str, token: str | None,
         first_rank: int = 1) -> dict:
    """An ItemCollection of ``answer`` (a search or listing answer of the service) with its items' links and
    the page's: self, root and, while more remain, ``next`` (GET: a URL with ``token``; POST: a body)."""
    body = {k: v for k, v in answer.items() if k != "next"}
    collection = item_collection(body, base, first_rank=first_rank)
    for item in collection["features"]:
        item_links(item, base)
    given = dict(search.given)
    here = f"{base}{path}"
    mine = given | ({"token": search.token} if search.token else {})
    collection["links"] = [_link("root", f"{base}/v1"),
                           _link("self", f"{here}?{_query_string(mine)}" if method == "GET" and mine else here,
                                 GEOJSON)]
    if token is not None:
        following = given | {"token": token}
        collection["links"].append(
            _link("next", f"{here}?{_query_string(following)}", GEOJSON, method="GET") if method == "GET" else
            _link("next", here, GEOJSON, method="POST", body=following, merge=False))
    return collection
