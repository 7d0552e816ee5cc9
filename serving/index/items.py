"""What an index knows about each item besides its code: footprint, acquisition time, properties; and the
place and time filters over them (STAC API semantics).

Columns, the optional fields of a shard's ids file (serving.index.versions), one value per item:

- ``west``, ``south``, ``east``, ``north``: float64, the footprint in WGS84 degrees (NaN: none);
- ``start``, ``end``: float64 POSIX seconds (UTC) of the acquisition time (NaN: none); an instant has
  ``start == end``, an interval (STAC ``start_datetime`` / ``end_datetime``) its two ends;
- ``props``: str, a JSON object of the item's other metadata (class, scene, window, a sidecar's or a
  STAC item's fields; ``source`` when the item's image is not ``<image root>/<id>``).

Filters:

- ``bbox`` ``[west, south, east, north]`` in WGS84 degrees (or the string ``"w,s,e,n"`` of a query
  string): an item passes when its footprint intersects the box, edges included. ``west > east`` is a
  box across the antimeridian.
- ``datetime``: an RFC 3339 instant (``2024-06-01T10:30:00Z``), a date (``2024-06-01``, that whole UTC
  day), or an interval ``A/B`` whose open end is ``..`` or empty: an item passes when its time (instant
  or interval) intersects it, ends included.
- ``intersects``: a GeoJSON geometry (serving.index.geometry; instead of ``bbox``): an item passes when
  its footprint shares a point with the geometry. Its bounding box filters first, as ``bbox`` would; the
  exact test then runs on what passed that.

An item with no footprint never passes a bbox (or intersects) filter, nor one with no time a datetime
filter. Every check is vectorised over a shard's columns (``ItemFilter.mask``).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone

import numpy as np

from serving.index.geometry import Geometry, GeometryError, parse_geometry

BBOX_FIELDS = ("west", "south", "east", "north")
TIME_FIELDS = ("start", "end")
META_FIELDS = (*BBOX_FIELDS, *TIME_FIELDS, "props")
WINDOW_MARK = "?window="  # a chip's id: <scene id>?window=col,row,width,height (pixels)
TIME_KEYS = ("datetime", "start_datetime", "end_datetime")  # STAC's instant, or its interval
_RESERVED = ("bbox", *TIME_KEYS)  # kept as columns, not in props


class FilterError(ValueError):
    """A bbox or datetime filter that cannot be read; ``field`` names which."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


# --- reading filters --------------------------------------------------------------------------------


def parse_bbox(value) -> tuple[float, float, float, float] | None:
    """``[west, south, east, north]`` (or ``"w,s,e,n"``) in WGS84 degrees, checked; None when absent."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        raise FilterError("bbox", f"bbox must be [west, south, east, north] (4 numbers, WGS84 degrees), got {value!r}")
    try:
        west, south, east, north = (float(v) for v in value)
    except (TypeError, ValueError):
        raise FilterError("bbox", f"bbox must hold 4 numbers, got {value!r}") from None
    if not all(math.isfinite(v) for v in (west, south, east, north)):
        raise FilterError("bbox", "bbox values must be finite numbers")
    if not (-180 <= west <= 180 and -180 <= east <= 180 and -90 <= south <= north <= 90):
        raise FilterError("bbox", f"bbox {[west, south, east, north]}: longitudes must lie in [-180, 180], "
                                  "latitudes in [-90, 90] with south <= north")
    return west, south, east, north


def _instant(text: str, end: bool) -> float:
    """POSIX seconds of an RFC 3339 date-time, or of a date's first (last, with ``end``) instant."""
    text = text.strip()
    if len(text) == 10:  # a date: the whole UTC day
        try:
            day = datetime.combine(date.fromisoformat(text), datetime.min.time(), timezone.utc)
        except ValueError:
            raise FilterError("datetime", f"datetime {text!r} is not an RFC 3339 date or date-time") from None
        try:
            return (day + timedelta(days=1) - timedelta(microseconds=1)).timestamp() if end else day.timestamp()
        except OverflowError:  # 9999-12-31 has no next day
            return (day + timedelta(hours=23, minutes=59, seconds=59)).timestamp() if end else day.timestamp()
    try:
        moment = datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        raise FilterError("datetime", f"datetime {text!r} is not an RFC 3339 date-time "
                                      "(like 2024-06-01T10:30:00Z)") from None
    if moment.tzinfo is None:
        raise FilterError("datetime", f"datetime {text!r} has no time zone; end it with Z or an offset like +02:00")
    try:
        return moment.timestamp()
    except (OverflowError, ValueError):  # an offset that pushes year 1 or 9999 out of range
        raise FilterError("datetime", f"datetime {text!r} is out of range") from None


def parse_datetime(value) -> tuple[float, float] | None:
    """(start, end) POSIX seconds of an instant, a date or an ``A/B`` interval (open ends are infinite);
    None when absent."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise FilterError("datetime", f"datetime must be a string (an RFC 3339 instant or A/B interval), got {value!r}")
    if "/" not in value:
        return _instant(value, end=False), _instant(value, end=True)
    first, _, last = value.partition("/")
    open_ends = ("", "..")
    if first.strip() in open_ends and last.strip() in open_ends:
        raise FilterError("datetime", f"datetime {value!r}: an interval needs at least one end")
    start = -math.inf if first.strip() in open_ends else _instant(first, end=False)
    stop = math.inf if last.strip() in open_ends else _instant(last, end=True)
    if start > stop:
        raise FilterError("datetime", f"datetime {value!r}: the interval ends before it starts")
    return start, stop


@dataclass(frozen=True)
class ItemFilter:
    """A place and time filter (either may be None); ``mask`` applies it to a shard's columns. With a
    ``geometry``, ``bbox`` is the geometry's bounding box and the items passing it are tested exactly."""

    bbox: tuple[float, float, float, float] | None = None
    interval: tuple[float, float] | None = None
    geometry: Geometry | None = None

    @classmethod
    def parse(cls, bbox=None, datetime=None, intersects=None) -> "ItemFilter | None":
        """The filter of a request's ``bbox`` or ``intersects`` (a GeoJSON geometry, or its JSON text) and
        ``datetime``, None when it has none (FilterError if bad, or given both bbox and intersects)."""
        box = parse_bbox(bbox)
        try:
            geometry = parse_geometry(intersects)
        except GeometryError as err:
            raise FilterError("intersects", str(err)) from None
        if geometry is not None and box is not None:
            raise FilterError("intersects", "bbox and intersects exclude each other (STAC API item search): "
                                            "give one of them")
        found = cls(geometry.bbox if geometry else box, parse_datetime(datetime), geometry)
        return found if found.bbox or found.interval else None

    def mask(self, columns: dict[str, np.ndarray] | None, n: int) -> np.ndarray:
        """bool (n,): which of ``n`` items pass; ``columns`` None (no metadata) passes none."""
        if columns is None:
            return np.zeros(n, dtype=bool)
        keep = np.ones(n, dtype=bool)
        if self.bbox is not None:
            west, south, east, north = self.bbox
            latitude = (columns["north"] >= south) & (columns["south"] <= north)
            if west <= east:
                longitude = (columns["east"] >= west) & (columns["west"] <= east)
            else:  # across the antimeridian: [west, 180] or [-180, east]
                longitude = (columns["east"] >= west) | (columns["west"] <= east)
            keep &= latitude & longitude  # NaN compares False: no footprint, no pass
        if self.interval is not None:
            start, stop = self.interval
            keep &= (columns["end"] >= start) & (columns["start"] <= stop)
        if self.geometry is not None:  # the exact test, on what passed its bounding box (and the interval)
            near = np.flatnonzero(keep)
            keep[near] = self.geometry.meets(*(columns[name][near] for name in BBOX_FIELDS))
        return keep


# --- writing columns --------------------------------------------------------------------------------


def item_time(metadata: dict) -> tuple[float, float]:
    """(start, end) POSIX seconds of an item's ``datetime`` or ``start_datetime``/``end_datetime``, NaN
    when it has none; ValueError for a time that does not parse."""
    def seconds(text, end):
        try:
            return _instant(str(text), end)
        except FilterError as err:
            raise ValueError(str(err).replace("datetime", "item time", 1)) from None

    if metadata.get("start_datetime") and metadata.get("end_datetime"):
        return seconds(metadata["start_datetime"], False), seconds(metadata["end_datetime"], True)
    if metadata.get("datetime"):
        return seconds(metadata["datetime"], False), seconds(metadata["datetime"], True)
    return math.nan, math.nan


def metadata_columns(metadata: list[dict]) -> dict[str, np.ndarray]:
    """The columns (see the module docstring) of items' metadata dicts: ``bbox``, ``datetime`` or
    ``start_datetime``/``end_datetime``, and anything else into ``props``; ValueError for a bad value."""
    n = len(metadata)
    bbox = np.full((n, 4), np.nan)
    times = np.full((n, 2), np.nan)
    props = []
    for i, meta in enumerate(metadata):
        meta = dict(meta or {})
        if meta.get("bbox") is not None:
            try:
                value = meta["bbox"]
                bbox[i] = parse_bbox(value if isinstance(value, str) else list(value))
            except FilterError as err:
                raise ValueError(f"item {i}: {err}") from None
        try:
            times[i] = item_time(meta)
        except ValueError as err:
            raise ValueError(f"item {i}: {err}") from None
        other = {k: v for k, v in meta.items() if k not in _RESERVED and v not in (None, "")}
        props.append(json.dumps(other, sort_keys=True, separators=(",", ":"), default=str))
    columns = {name: bbox[:, j] for j, name in enumerate(BBOX_FIELDS)}
    columns.update({name: times[:, j] for j, name in enumerate(TIME_FIELDS)})
    columns["props"] = np.array(props, dtype=str) if props else np.empty(0, dtype="<U2")
    return columns


def empty_columns(n: int) -> dict[str, np.ndarray]:
    """The columns of ``n`` items that have no metadata."""
    return metadata_columns([{}] * n)


# --- reading columns back ---------------------------------------------------------------------------


def rfc3339(seconds: float) -> str:
    """POSIX seconds as an RFC 3339 UTC instant (``2024-06-01T10:30:00Z``; microseconds when it has them)."""
    moment = datetime.fromtimestamp(seconds, timezone.utc)
    text = moment.isoformat(timespec="microseconds" if moment.microsecond else "seconds")
    return text.replace("+00:00", "Z")


def extent(columns: dict[str, np.ndarray] | None) -> dict:
    """The footprints' box and the times' interval of a shard's items (None where no item has one):
    ``{"bbox": [west, south, east, north] | None, "interval": [start, end] (POSIX seconds) | None}``.
    A footprint across the antimeridian (west > east) widens the box to every longitude."""
    out = {"bbox": None, "interval": None}
    if columns is None:
        return out
    known = np.isfinite(columns["west"])
    if known.any():
        west, east = columns["west"][known], columns["east"][known]
        across = bool((west > east).any())
        out["bbox"] = [-180.0 if across else float(west.min()), float(columns["south"][known].min()),
                       180.0 if across else float(east.max()), float(columns["north"][known].max())]
    timed = np.isfinite(columns["start"])
    if timed.any():
        out["interval"] = [float(columns["start"][timed].min()), float(columns["end"][timed].max())]
    return out


def describe(columns: dict[str, np.ndarray], position: int) -> dict:
    """What a hit carries about its item: ``bbox`` (when it has one), ``datetime`` (an instant) or
    ``start_datetime``/``end_datetime`` (an interval), and ``properties``."""
    out = {}
    box = [float(columns[name][position]) for name in BBOX_FIELDS]
    if not any(math.isnan(v) for v in box):
        out["bbox"] = box
    start, end = float(columns["start"][position]), float(columns["end"][position])
    if not math.isnan(start):
        if start == end:
            out["datetime"] = rfc3339(start)
        else:
            out["start_datetime"], out["end_datetime"] = rfc3339(start), rfc3339(end)
    out["properties"] = json.loads(str(columns["props"][position]) or "{}")
    return out
