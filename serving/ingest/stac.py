"""STAC in: a static catalog, collection or ItemCollection as the input of an index build.

``catalog_items(path)`` reads a static catalog, collection or ItemCollection file with
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

from serving.index.items import TIME_KEYS
from serving.ingest.archive import IMAGE_SUFFIXES, ArchiveError, ItemsCollector

IMAGE_TYPES = ("image/jpeg", "image/png", "image/tiff")  # a media type that starts with one of these
ROLES = ("visual", "data")


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
    """The serving.ingest.items.Items of a static STAC catalog (see the module docstring)."""
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
        properties = {k: v for k, v in item.properties.items() if k not in TIME_KEYS}
        label = str(properties.pop("class", None) or properties.pop("label", None) or "")  # the item's class
        metadata = {"source": href, "collection": item.collection_id, **properties,
                    **{k: item.properties[k] for k in TIME_KEYS if item.properties.get(k)}}
        if item.datetime is not None and "datetime" not in metadata:
            metadata["datetime"] = item.datetime.isoformat()
        if item.bbox:
            metadata["bbox"] = list(item.bbox[:2]) + list(item.bbox[-2:])  # a 3D bbox's horizontal extent
        record = {"class": label, "captions": [], "metadata": metadata}
        collector.add_file(item.id, href, record)
    return collector.items(path.parent)
