"""Thumbnails of indexed items: a small JPEG made from the item's image on first request, then cached.

``GET /v1/items/{id}/thumbnail`` (serving.runtime.views) answers with ``make_thumbnail`` of the item's
image reference: a local file, an ``s3://`` object (serving.ingest.archive.read_source), or a scene's chip
(``<scene>?window=col,row,width,height`` with the chip's bands and stretch in its properties, read
as the index read it, serving.ingest.geo). ``ThumbnailCache`` keeps the JPEGs in the router's memory,
bounded in bytes, least recently used out first. Hits carry ``thumbnail_path(image id)``, a path
relative to the app's root.
"""
from __future__ import annotations

import io
import threading
from collections import OrderedDict
from urllib.parse import quote

from serving.index.items import WINDOW_MARK

THUMBNAIL_SIDE = 128  # pixels, the longer side
JPEG_QUALITY = 85


def thumbnail_path(image_id: str) -> str:
    """The app-relative URL of an item's thumbnail (the id percent-encoded, its slashes kept)."""
    return f"/v1/items/{quote(image_id, safe='/,')}/thumbnail"


def item_image_pil(image_ref: str, properties: dict):
    """A PIL image of the item: its chip read from the scene, or its file decoded (Pillow)."""
    from PIL import Image

    stretch = properties.get("stretch")
    if WINDOW_MARK in image_ref and "window" in properties and stretch:
        from serving.ingest.geo import ChipRef

        scene = image_ref.split(WINDOW_MARK, 1)[0]
        ref = ChipRef(scene, tuple(properties["window"]), tuple(stretch["bands"]), tuple(stretch["low"]),
                      tuple(stretch["high"]))
        return Image.fromarray(ref.read())
    from serving.ingest.archive import read_source

    data = read_source(image_ref)
    image = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
    image.load()
    return image


def make_thumbnail(image_ref: str, properties: dict, side: int = THUMBNAIL_SIDE) -> bytes:
    """JPEG bytes of the item's image scaled to fit ``side`` x ``side`` (aspect kept); OSError or
    ValueError when the image cannot be read."""
    image = item_image_pil(image_ref, properties).convert("RGB")
    image.thumbnail((side, side))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


class ThumbnailCache:
    """JPEG bytes by key, at most ``max_bytes`` in all (least recently used dropped first); thread-safe."""

    def __init__(self, max_bytes: int = 32 * 2**20):
        self.max_bytes, self.size = max_bytes, 0
        self._items: OrderedDict[tuple, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
            return data

    def put(self, key: tuple, data: bytes) -> None:
        with self._lock:
            if key in self._items or len(data) > self.max_bytes:
                return
            self._items[key] = data
            self.size += len(data)
            while self.size > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self.size -= len(dropped)
