"""STAC in and out: a static catalog as the input of an index build, search results as an ItemCollection.

**Out.** ``item_collection(answer, base_url)`` turns a search answer into a STAC API ItemCollection
(GeoJSON FeatureCollection, STAC 1.1.0): one Item per hit, in rank order, whose ``geometry`` is the
footprint's polygon and ``bbox`` the footprint (both null for an item without one), whose
``properties`` hold ``datetime`` (or ``start_datetime``/``end_datetime``), the item's own properties,
and ``terrahash:rank``, ``terrahash:score`` and ``terrahash:distance``; assets ``image`` (the file;
for a chip, its scene, with the pixel window in ``properties.window``) and ``thumbnail``. The
answer's other fields (arm, versions, query) stay as foreign members. STAC requires a time: an item
indexed without one has ``datetime`` null and does not validate; give the archive's sidecar or
catalog a ``datetime``.

**In.** ``catalog_items(path)`` reads a static catalog, collection or ItemCollection file with
pystac and indexes each item's image asset: the one named by ``asset``, else the first whose roles
include ``visual`` or ``data`` (in that order) with an image media type or suffix. An item's id is
its STAC id (unique across the catalog); its bbox, datetime (or interval) and properties (with the
``collection``) are its metadata, its ``class`` (or ``label``) property its class. GeoTIFF scenes
are cut into chips as an archive's are (serving.ingest.archive). Items without a readable image asset are
skipped and reported (count, id, reason), never silently dropped.
"""
from __future__ import annotations

import json
from pathlib import Path

from serving.ingest.archive import IMAGE_SUFFIXES, ArchiveError, ItemsCollector
from serving.runtime.thumbnails import WINDOW_MARK

STAC_VERSION = "1.1.0"
IMAGE_TYPES = ("image/jpeg", "image/png", "image/tiff")  # a media type that starts with one of these
ROLES = ("visual", "data")
MEDIA_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png",
               ".tif": "image/tiff; application=geotiff", ".tiff": "image/tiff; application=geotiff"}
_TIME_KEYS = ("datetime", "start_datetime", "end_datetime")


# --- out ------------------------------------------------------------------------------------------


def _polygon(bbox):
    west, south, east, north = bbox
    return {"type": "Polygon", "coordinates": [[[west, south], [east, south], [east, north], [west, north],
                                                [west, south]]]}


def stac_item(hit: dict, base_url: str = "", rank: int | None = None) -> dict:
    """One search hit (or listed item) as a STAC Item (see the module docstring)."""
    own = dict(hit.get("properties") or {})
    own.pop("source", None)
    properties = {"datetime": hit.get("datetime"), **{k: hit[k] for k in _TIME_KEYS[1:] if k in hit}, **own}
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


def item_collection(answer: dict, base_url: str = "", next_body: dict | None = None) -> dict:
    """A search or listing answer as a STAC ItemCollection; ``next_body``: the POST body of the next page."""
    hits = answer.get("results", [])
    rest = {k: v for k, v in answer.items() if k not in ("results", "matched", "next")}
    collection = {"type": "FeatureCollection", "features": [stac_item(h, base_url, n + 1) for n, h in enumerate(hits)],
                  "numberReturned": len(hits), "links": [], **rest}
    if "matched" in answer:
        collection["numberMatched"] = answer["matched"]
    if next_body is not None:
        collection["links"].append({"rel": "next", "type": "application/geo+json", "method": "POST",
                                    "href": base_url.rstrip("/") + "/v1/search/items", "body": next_body})
    return collection


# --- in -------------------------------------------------------------------------------------------


def read_catalog(path: Path):
    """The pystac items of a catalog, collection or ItemCollection file, and the file's folder."""
    import pystac

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ArchiveError(f"--stac {path}: cannot read it as JSON ({err})") from None
    try:
        if data.get("type") == "FeatureCollection":
            return list(pystac.ItemCollection.from_dict(data, preserve_dict=False).items)
        found = pystac.read_file(str(path))
    except (pystac.STACError, KeyError, TypeError, ValueError) as err:
        raise ArchiveError(f"--stac {path}: not a STAC catalog, collection or item collection ({err})") from None
    if isinstance(found, pystac.Item):
        return [found]
    return list(found.get_items(recursive=True))


def _asset(item, name: str | None):
    """(href, None) of the item's image asset, or (None, why not)."""
    if name is not None:
        asset = item.assets.get(name)
        if asset is None:
            return None, f"has no asset {name!r} (it has {sorted(item.assets)})"
        return asset.get_absolute_href(), None

    def is_image(asset):
        kind = (asset.media_type or "").lower()
        return kind.startswith(IMAGE_TYPES) or Path(asset.href.split("?")[0]).suffix.lower() in IMAGE_SUFFIXES

    for role in ROLES:
        for asset in item.assets.values():
            if role in (asset.roles or []) and is_image(asset):
                return asset.get_absolute_href(), None
    images = [a for a in item.assets.values() if is_image(a) and "thumbnail" not in (a.roles or [])]
    if images:
        return images[0].get_absolute_href(), None
    return None, f"has no image asset (JPEG, PNG or TIFF) among {sorted(item.assets)}; name one with --stac-asset"


def catalog_items(source: str | Path, chips=None, asset: str | None = None):
    """The serving.ingest.build.Items of a static STAC catalog (see the module docstring)."""
    path = Path(source).expanduser().resolve()
    if not path.is_file():
        raise ArchiveError(f"--stac {source}: no such file (give a catalog.json, collection.json or item collection)")
    items = read_catalog(path)
    if not items:
        raise ArchiveError(f"--stac {source}: the catalog holds no items")
    seen: dict[str, str] = {}
    collector = ItemsCollector(chips)
    for item in items:
        if item.id in seen:
            raise ArchiveError(f"--stac {source}: item id {item.id!r} appears twice (collections "
                               f"{seen[item.id]!r} and {item.collection_id!r}); ids must be unique to index")
        seen[item.id] = item.collection_id
        href, why = _asset(item, asset)
        if href is None:
            collector.skip(f"stac:{item.id}", why)
            continue
        if href.startswith(("http://", "https://")):
            collector.skip(href, "http(s) assets are not fetched; mirror them to a folder or S3")
            continue
        properties = {k: v for k, v in item.properties.items() if k not in _TIME_KEYS}
        label = str(properties.pop("class", None) or properties.pop("label", None) or "")  # the item's class
        metadata = {"source": href, "collection": item.collection_id, **properties,
                    **{k: item.properties[k] for k in _TIME_KEYS if item.properties.get(k)}}
        if item.datetime is not None and "datetime" not in metadata:
            metadata["datetime"] = item.datetime.isoformat()
        if item.bbox:
            metadata["bbox"] = list(item.bbox[:2]) + list(item.bbox[-2:])  # a 3D bbox's horizontal extent
        record = {"class": label, "captions": [], "metadata": metadata}
        collector.add_file(item.id, href, record)
    return collector.items(path.parent)
