"""Where each row's image is: ``ImageRefs`` over a manifest's image roots (the root of the build or add that
wrote the row)."""
from __future__ import annotations

import bisect


class ImageRefs:
    """Where the image of an item is: ``<root>/<image id>``, the root being that of the build or add
    that wrote the item's row (a manifest's ``image_roots``: [{"root", "rows": [first, last]}], rows
    of its own collection). Manifests written before image_roots existed use ``extra.image_root`` for
    every row. ``base`` (a serve setting) replaces every root.

    ``refs(row, image_id)`` -> the reference; a caption's row resolves to the root of the images it
    was added with.
    """

    def __init__(self, manifest: dict, base: str | None = None):
        self.base = base
        spans = sorted(_image_roots(manifest), key=lambda span: span["rows"][0])
        self._starts = [span["rows"][0] for span in spans]
        self._spans = spans
        self._default = manifest.get("extra", {}).get("image_root", "") if not spans else ""

    def root(self, row: int) -> str:
        """The image root of ``row`` ("" when none was recorded: the id is the reference)."""
        if self.base is not None:
            return self.base
        i = bisect.bisect_right(self._starts, int(row)) - 1
        if i >= 0 and self._spans[i]["rows"][0] <= row <= self._spans[i]["rows"][1]:
            return self._spans[i]["root"]
        return self._default

    def __call__(self, row: int, image_id: str) -> str:
        root = self.root(row)
        return f"{root.rstrip('/')}/{image_id}" if root else image_id


def _image_roots(manifest: dict) -> list[dict]:
    """A manifest's image roots; for one written before they existed, its extra.image_root for every row."""
    if "image_roots" in manifest:
        return [dict(span) for span in manifest["image_roots"]]
    legacy = manifest.get("extra", {}).get("image_root")
    return [{"root": legacy, "rows": [0, int(manifest["next_row"]) - 1]}] if legacy and manifest["next_row"] else []


def _with_root(spans: list[dict], image_root: str | None, first_row: int, n: int) -> list[dict]:
    """``spans`` plus rows first_row..first_row+n-1 under ``image_root`` (merged with the last span when
    it continues it under the same root)."""
    if not image_root or not n:
        return spans
    last = first_row + n - 1
    if spans and spans[-1]["root"] == str(image_root) and spans[-1]["rows"][1] == first_row - 1:
        return [*spans[:-1], {"root": str(image_root), "rows": [spans[-1]["rows"][0], last]}]
    return [*spans, {"root": str(image_root), "rows": [first_row, last]}]
