"""STAC out: search results and item listings as a STAC API ItemCollection.

``item_collection(answer, base_url)`` turns a search answer into a STAC API ItemCollection
(GeoJSON FeatureCollection, STAC 1.1.0): one Item per hit, in rank order, whose ``geometry`` is the
footprint's polygon and ``bbox`` the footprint (both null for an item without one), whose
``properties`` hold ``datetime`` (or ``start_datetime``/``end_datetime``), the item's own properties,
and ``terrahash:rank``, ``terrahash:score`` and ``terrahash:distance``; assets ``image`` (the file;
for a chip, its scene, with the pixel window in ``properties.window``) and ``thumbnail``. The
answer's other fields (arm, versions, query) stay as foreign members. STAC requires a time: an item
indexed without one has ``datetime`` null and does not validate; give the archive's sidecar or
catalog a ``datetime``.
"""
from __future__ import annotations

from pathlib import Path

from serving.index.items import TIME_KEYS, WINDOW_MARK

STAC_VERSION = "1.1.0"
MEDIA_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png",
               ".tif": "image/tiff; application=geotiff", ".tiff": "image/tiff; application=geotiff"}


def _polygon(bbox):
    west, south, east, north = bbox
    return {"type": "Polygon", "coordinates": [[[west, south], [east, south], [east, north], [west, north],
                                                [west, south]]]}


def stac_item(hit: dict, base_url: str = "", rank: int | None = None) -> dict:
    """One search hit (or listed item) as a STAC Item (see the module docstring)."""
    own = dict(hit.get("properties") or {})
    own.pop("source", None)
    properties = {"datetime": hit.get("datetime"), **{k: hit[k] for k in TIME_KEYS[1:] if k in hit}, **own}
    for key in ("score", "distance", "asymmetric_distance", "image_score", "caption_score"):
        if hit.get(key) is not None:
            properties[f"terrahash:{key}"] = hit[key]
    if rank is not None:
        properties["terrahash:rank"] = rank
    image = str(hit.get("image") or "")
    href = image.split(WINDOW_MARK, 1)[0] if "window" in own else image
    assets = {"image": {"href": href, "roles": ["data"], "title": "the indexed image (a chip: its scene)",
                        **({"type": MEDIA_TYPES[Path(href).suffix.lower()]}
                           if Path(href).suffix.lower() in MEDIA_TYPES else {})}}
    if hit.get("thumbnail"):
        assets["thumbnail"] = {"href": base_url.rstrip("/") + hit["thumbnail"], "type": "image/jpeg",
                               "roles": ["thumbnail"]}
    item = {"type": "Feature", "stac_version": STAC_VERSION, "stac_extensions": [], "id": hit["id"],
            "geometry": _polygon(hit["bbox"]) if hit.get("bbox") else None, "properties": properties,
            "links": [], "assets": assets}
    if hit.get("bbox"):
        item["bbox"] = list(hit["bbox"])
    return item


def item_collection(answer: dict, base_url: str = "", next_body: dict | None = None, first_rank: int = 1) -> dict:
    """A search or listing answer as a STAC ItemCollection; ``next_body``: the POST body of the next page;
    ``first_rank``: the rank of the answer's first hit (a later page's)."""
    hits = answer.get("results", [])
    rest = {k: v for k, v in answer.items() if k not in ("results", "matched", "next")}
    collection = {"type": "FeatureCollection",
                  "features": [stac_item(h, base_url, first_rank + n) for n, h in enumerate(hits)],
                  "numberReturned": len(hits), "links": [], **rest}
    if "matched" in answer:
        collection["numberMatched"] = answer["matched"]
    if next_body is not None:
        collection["links"].append({"rel": "next", "type": "application/geo+json", "method": "POST",
                                    "href": base_url.rstrip("/") + "/v1/search/items", "body": next_body})
    return collection
