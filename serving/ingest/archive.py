"""Archives as users have them: a folder tree or an S3 prefix of image files, no dataset JSON.

``archive_items(source)`` walks ``source`` (a local folder, or ``s3://bucket/prefix``) for JPEG,
PNG and TIFF files (hidden files and folders left out), in sorted order. An item's id is its path
relative to ``source`` (``beach/beach00.jpg``), so the same files get the same ids wherever the
archive is mounted; its source URI is ``<source>/<id>``, which the index records as the image root
of the rows it writes (serving.index.refs.ImageRefs).

An optional sidecar, CSV or JSON, gives per-image classes and captions (and other fields, kept as
metadata) by id:

- CSV: a header row with an ``id`` column; optional ``class`` and ``caption`` columns (several
  captions of one image separated by `` | ``); any other column is metadata.
- JSON: a list of objects, ``{"items": [...]}`` of them, or a mapping from id to object; each
  object may have ``class`` (or ``label``), ``captions`` (a list) or ``caption``, and other fields.

A sidecar row whose id names no image file is an error (a sidecar that does not match its archive
is a mistake worth stopping for); images the sidecar does not name simply have no class or captions.

TIFFs that are scenes (georeferenced, larger than a chip, or not 3 bands of bytes) are cut into
chips (serving.ingest.geo: band selection, percentile stretch, nodata, footprints); each chip is an item
of its own, ``<scene id>?window=col,row,width,height``, with ``scene``, ``window``, ``stretch``
(bands, low, high: how to read it again, for thumbnails), ``bbox`` (WGS84) and ``datetime`` in its
metadata (a sidecar row of the scene adds to every chip's; its ``datetime`` wins over the file's,
the chip's footprint over its ``bbox``). The index keeps this metadata (serving.index.items). A scene that cannot be opened is left out and reported like
any unreadable image. Scenes under an S3 prefix are read in place by GDAL (/vsis3/, with the
endpoint and keys boto3 uses: serving.ingest.geo.gdal_env), window by window.

Reading images from S3 goes through ``read_source``: the Ray encoding tasks fetch the bytes of an
``s3://`` input themselves (boto3, ``AWS_ENDPOINT_URL`` for another S3-compatible store), so
nothing is copied to local disk first.
"""
from __future__ import annotations

import csv
import functools
import io
import json
from pathlib import Path
from urllib.parse import urlparse

from serving.ingest.items import Items

TIFF_SUFFIXES = (".tif", ".tiff")  # read as scenes when they are (serving.ingest.geo)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", *TIFF_SUFFIXES)
CAPTION_SEPARATOR = " | "
_CLASS_KEYS = ("class", "label")


class ArchiveError(ValueError):
    """An archive or sidecar that cannot be indexed as given."""


def _hidden(key: str) -> bool:
    return any(part.startswith(".") for part in key.split("/"))


def is_image_key(key: str) -> bool:
    """Whether a relative path names an image file the index reads (by suffix, any case), not hidden."""
    return key.lower().endswith(IMAGE_SUFFIXES) and not _hidden(key)


def list_images(source: str | Path) -> tuple[str, list[str]]:
    """(the archive root as a URI or absolute folder, the sorted relative paths of its image files)."""
    text = str(source)
    if text.startswith("s3://"):
        from serving.storage import S3Root

        root = S3Root(text)
        keys = root.list()
        base = root.uri
    else:
        folder = Path(text).expanduser()
        if not folder.is_dir():
            raise ArchiveError(f"--images {text}: no such folder (give a folder of images or s3://bucket/prefix)")
        folder = folder.resolve()
        keys = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        base = str(folder)
    images = [k for k in keys if is_image_key(k)]
    if not images:
        raise ArchiveError(f"--images {text}: no image files ({', '.join(IMAGE_SUFFIXES)}) found there")
    return base, images


def read_sidecar(path: str | Path) -> dict[str, dict]:
    """Per-image records by id from a CSV or JSON sidecar: {id: {"class", "captions", "metadata"}}."""
    path = Path(path)
    if not path.is_file():
        raise ArchiveError(f"sidecar {path}: no such file")
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        if not reader.fieldnames or "id" not in reader.fieldnames:
            raise ArchiveError(f"sidecar {path}: a CSV sidecar needs a header row with an 'id' column "
                               f"(found {reader.fieldnames})")
        rows = []
        for row in reader:
            captions = [c.strip() for c in (row.pop("caption", "") or "").split(CAPTION_SEPARATOR.strip())]
            rows.append({**row, "captions": [c for c in captions if c]})
    elif path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ArchiveError(f"sidecar {path}: not valid JSON ({err})") from None
        if isinstance(data, dict) and "items" in data:
            data = data["items"]
        if isinstance(data, dict):
            data = [{"id": key, **value} for key, value in data.items() if isinstance(value, dict)]
        if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
            raise ArchiveError(f"sidecar {path}: expected a list of objects, {{'items': [...]}} or {{id: object}}")
        rows = data
    else:
        raise ArchiveError(f"sidecar {path}: expected a .csv or .json file")
    records: dict[str, dict] = {}
    for n, row in enumerate(rows):
        image_id = str(row.get("id") or "").strip().removeprefix("./")
        if not image_id:
            raise ArchiveError(f"sidecar {path}: row {n + 1} has no id")
        if image_id in records:
            raise ArchiveError(f"sidecar {path}: id {image_id!r} appears twice")
        captions = row.get("captions", [])
        if isinstance(row.get("caption"), str):
            captions = [row["caption"]]
        if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
            raise ArchiveError(f"sidecar {path}: the captions of {image_id!r} must be a list of strings")
        label = next((str(row[k]) for k in _CLASS_KEYS if row.get(k) not in (None, "")), "")
        metadata = {k: v for k, v in row.items() if k not in ("id", "captions", "caption", *_CLASS_KEYS)}
        records[image_id] = {"class": label, "captions": [c.strip() for c in captions if c.strip()],
                             "metadata": metadata}
    return records


def _geo_available() -> bool:
    try:
        import rasterio  # noqa: F401
    except ImportError:
        return False
    return True


class ItemsCollector:
    """Gathers the items of an archive or catalog: plain images as they are, TIFF scenes (when rasterio is
    installed; local or on S3) as their chips; unreadable scenes skipped with the reason."""

    def __init__(self, chips=None):
        self.geo = _geo_available()
        if self.geo and chips is None:
            from serving.ingest.geo import ChipConfig

            chips = ChipConfig()
        self.chips, self.chipped, self.nodata_chips = chips, False, 0
        self.out = {name: [] for name in ("ids", "paths", "caption_ids", "caption_image_ids", "captions", "labels",
                                          "metadata", "skipped")}

    def skip(self, path: str, reason: str) -> None:
        self.out["skipped"].append([str(path), reason])

    def add(self, item_id: str, path, record: dict, metadata: dict) -> None:
        """One item: its id, what the encoder reads (a path, URI or ChipRef), its sidecar record, metadata."""
        out = self.out
        for n, caption in enumerate(record.get("captions", [])):
            out["caption_ids"].append(f"{item_id}#{n}")
            out["caption_image_ids"].append(item_id)
            out["captions"].append(caption)
        out["ids"].append(item_id)
        out["paths"].append(path)
        out["labels"].append(record.get("class", ""))
        out["metadata"].append(metadata)

    def add_file(self, item_id: str, path: str, record: dict) -> None:
        """An image file, or a scene's chips: ``<item id>?window=...`` each, with the scene's id, the pixel
        window, the band stretch, the chip's footprint and the scene's time (the record's time wins)."""
        own = record.get("metadata", {})
        if not (self.geo and path.lower().endswith(TIFF_SUFFIXES)):
            self.add(item_id, path, record, own)
            return
        from serving.ingest.geo import scene_chips

        try:
            plan = scene_chips(path, self.chips, only_scenes=True)  # None: a plain image
        except OSError as err:  # rasterio's RasterioIOError: not a raster it can open
            self.skip(path, f"cannot read it as a raster: {err}")
            return
        if plan is None:
            self.add(item_id, path, record, own)
            return
        self.chipped = True
        self.nodata_chips += plan.skipped_nodata
        for chip in plan.chips:
            ref = chip.ref
            meta = {**own, "scene": item_id, "window": list(ref.window),
                    "stretch": {"bands": list(ref.bands), "low": list(ref.low), "high": list(ref.high)},
                    "bbox": list(chip.bbox) if chip.bbox else own.get("bbox")}
            if not any(own.get(k) for k in ("datetime", "start_datetime")):
                meta["datetime"] = chip.datetime
            if own.get("source"):
                meta["source"] = own["source"] + chip.id_suffix
            self.add(item_id + chip.id_suffix, ref, {**record, "captions": []}, meta)

    def items(self, root):
        """The serving.ingest.items.Items gathered, under ``root`` (a folder, or an s3:// URI)."""
        out = self.out
        extra = ({"chips": {"size": self.chips.size, "overlap": self.chips.overlap,
                            "skipped_nodata": self.nodata_chips}} if self.chipped else {})
        return Items(root, out["ids"], out["paths"], out["caption_ids"], out["caption_image_ids"], out["captions"],
                     out["labels"], out["metadata"], out["skipped"], extra)


def archive_items(source: str | Path, sidecar: str | Path | None = None, chips=None):
    """The serving.ingest.items.Items of an archive (see the module docstring); ``chips`` is the
    serving.ingest.geo.ChipConfig scenes are cut by (default: 256-pixel chips, no overlap)."""
    base, keys = list_images(source)
    records = read_sidecar(sidecar) if sidecar else {}
    unknown = sorted(set(records) - set(keys))
    if unknown:
        raise ArchiveError(f"sidecar {sidecar}: {len(unknown)} id(s) name no image file under {base} "
                           f"(first: {', '.join(unknown[:5])}); ids are paths relative to the archive root")
    collector = ItemsCollector(chips)
    for key in keys:
        collector.add_file(key, f"{base}/{key}", records.get(key, {}))
    return collector.items(base if base.startswith("s3://") else Path(base))


# What a task needs to reach the store the driver lists from, when the workers were started
# without it (a local Ray started before the settings were made).
S3_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
          "AWS_DEFAULT_REGION", "AWS_PROFILE")


def s3_env() -> dict[str, str]:
    """The S3 settings of this process's environment, for the runtime_env of the tasks that read."""
    import os

    return {name: os.environ[name] for name in S3_ENV if os.environ.get(name)}


@functools.lru_cache(maxsize=8)
def _bucket(name: str):
    """One serving.storage.S3Root per bucket and process, so a task makes one boto3 client."""
    from serving.storage import S3Root

    return S3Root(f"s3://{name}")


def read_source(item):
    """An encoder input as given, except an ``s3://`` URI (the object's bytes; FileNotFoundError when
    it cannot be read) and a scene's chip (its RGB pixels)."""
    if hasattr(item, "read"):  # a serving.ingest.geo.ChipRef: one windowed read of a scene
        return item.read()
    if not (isinstance(item, str) and item.startswith("s3://")):
        return item
    from botocore.exceptions import ClientError

    parsed = urlparse(item)
    try:
        return _bucket(parsed.netloc).read_bytes(parsed.path.lstrip("/"))
    except ClientError as err:  # read_bytes raises FileNotFoundError itself for a missing key
        raise FileNotFoundError(f"{item}: {err.response.get('Error', {}).get('Code', err)}") from None
