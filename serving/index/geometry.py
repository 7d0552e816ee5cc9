"""GeoJSON geometries as a place filter (STAC API item search's ``intersects``): reading one (RFC 7946,
checked) and an exact test of which item footprints it meets.

Footprints are axis-aligned boxes ``[west, south, east, north]`` in WGS84 degrees, ``west > east`` a box
across the antimeridian (serving.index.items). A geometry meets a box when they share a point, boundaries
included (as the bbox filter): some segment of the geometry meets the box (a point is a segment of length
zero, so a vertex inside counts, and so does a line crossing the box between two vertices outside it), or
the box lies inside one of its polygons. The second is decided by one corner of the box: when no boundary
of the polygon meets the box, the whole box is on one side of it, and the even-odd rule over all of the
polygon's rings (outer and holes) tells which, a box inside a hole being outside.

Coordinates are planar longitude and latitude, as the bbox filter takes them: edges are straight in
degrees, not geodesics, and a geometry does not wrap around the antimeridian (RFC 7946 asks that one
across it be cut in two, a MultiPolygon or MultiLineString). Types: Point, MultiPoint, LineString,
MultiLineString, Polygon, MultiPolygon and GeometryCollection (of the others, not nested).

The test is vectorised over the boxes (numpy), a block of segments at a time; ItemFilter.mask runs it only
on the items whose footprint meets the geometry's own bounding box.
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass

import numpy as np

TYPES = ("Point", "MultiPoint", "LineString", "MultiLineString", "Polygon", "MultiPolygon", "GeometryCollection")
MAX_POSITIONS = 10_000  # per geometry: the test costs (segments x candidate boxes)
_CELLS = 1 << 21  # segment-box pairs per numpy block


class GeometryError(ValueError):
    """A value that is no usable GeoJSON geometry."""


@dataclass(frozen=True)
class Geometry:
    """A checked GeoJSON geometry: its segments ``(x1, y1, x2, y2)`` (a point: both ends the same), its
    polygons as ranges ``(first, stop)`` of those segments (every ring's edges), and its bounding box."""

    kind: str
    segments: tuple[tuple[float, float, float, float], ...]
    polygons: tuple[tuple[int, int], ...]
    bbox: tuple[float, float, float, float]

    @functools.cached_property
    def _edges(self) -> np.ndarray:
        return np.asarray(self.segments, dtype=np.float64).reshape(-1, 4)

    def meets(self, west, south, east, north) -> np.ndarray:
        """bool (n,): which of ``n`` boxes (arrays of their sides; ``west > east`` across the antimeridian)
        share a point with the geometry."""
        west, south, east, north = (np.asarray(v, dtype=np.float64).reshape(-1) for v in (west, south, east, north))
        n = len(west)
        across = np.flatnonzero(west > east)  # such a box is two: [west, 180] and [-180, east]
        hit = _meets_boxes(self, np.concatenate([west, np.full(len(across), -180.0)]),
                           np.concatenate([south, south[across]]),
                           np.concatenate([np.where(west > east, 180.0, east), east[across]]),
                           np.concatenate([north, north[across]]))
        out = hit[:n].copy()
        out[across] |= hit[n:]
        return out


def _meets_boxes(geometry: Geometry, west, south, east, north) -> np.ndarray:
    """bool (m,): the boxes (none across the antimeridian) that share a point with ``geometry``."""
    hit = np.zeros(len(west), dtype=bool)
    edges = geometry._edges
    if not len(west):
        return hit
    block = max(1, _CELLS // len(west))
    for first in range(0, len(edges), block):
        todo = np.flatnonzero(~hit)
        if not len(todo):
            return hit
        x1, y1, x2, y2 = (c[:, None] for c in edges[first:first + block].T)
        hit[todo] = _segments_meet(x1, y1, x2, y2, west[todo], south[todo], east[todo], north[todo]).any(axis=0)
    for first, stop in geometry.polygons:  # no boundary meets the rest: each lies wholly inside or outside
        todo = np.flatnonzero(~hit)
        if not len(todo):
            break
        hit[todo] = _inside(edges[first:stop], west[todo], south[todo])
    return hit


def _segments_meet(x1, y1, x2, y2, west, south, east, north) -> np.ndarray:
    """bool (segments, boxes): Liang-Barsky clipping of each segment to each box, boundaries included; a
    segment of length zero meets a box when its point lies in it."""
    dx, dy = x2 - x1, y2 - y1
    shape = np.broadcast_shapes(x1.shape, west.shape)
    low, high, ok = np.zeros(shape), np.ones(shape), np.ones(shape, dtype=bool)
    with np.errstate(divide="ignore", invalid="ignore"):
        for p, q in ((-dx, x1 - west), (dx, east - x1), (-dy, y1 - south), (dy, north - y1)):
            p, q = np.broadcast_arrays(p, q)
            ok &= (p != 0) | (q >= 0)  # parallel to this side: on its inner side, or never in
            ratio = q / p
            low = np.where(p < 0, np.maximum(low, ratio), low)
            high = np.where(p > 0, np.minimum(high, ratio), high)
    return ok & (low <= high)


def _inside(edges: np.ndarray, x, y) -> np.ndarray:
    """bool (n,): which points lie inside the polygon of ``edges`` (all its rings' edges), by the even-odd
    rule: a ray to the east crosses its boundary an odd number of times."""
    inside = np.zeros(len(x), dtype=bool)
    block = max(1, _CELLS // max(len(x), 1))
    with np.errstate(divide="ignore", invalid="ignore"):
        for first in range(0, len(edges), block):
            x1, y1, x2, y2 = (c[:, None] for c in edges[first:first + block].T)
            straddles = (y1 > y) != (y2 > y)
            crosses = straddles & (x < x1 + (y - y1) * (x2 - x1) / (y2 - y1))
            inside ^= np.logical_xor.reduce(crosses, axis=0)
    return inside


# --- reading GeoJSON --------------------------------------------------------------------------------


def parse_geometry(value) -> Geometry | None:
    """A GeoJSON geometry object (or its JSON text, as a query string carries it), checked; None when
    absent. GeometryError names what is wrong."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise GeometryError("intersects must be a GeoJSON geometry (GET: its JSON text), "
                                f"got {value[:80]!r}") from None
    reader = _Reader()
    reader.geometry(value, nested=False)
    if not reader.segments:
        raise GeometryError("intersects has no coordinates")
    xs = [c for s in reader.segments for c in (s[0], s[2])]
    ys = [c for s in reader.segments for c in (s[1], s[3])]
    return Geometry(value["type"], tuple(reader.segments), tuple(reader.polygons),
                    (min(xs), min(ys), max(xs), max(ys)))


class _Reader:
    """Collects a geometry's segments and polygons while checking it."""

    def __init__(self):
        self.segments: list[tuple[float, float, float, float]] = []
        self.polygons: list[tuple[int, int]] = []
        self.positions = 0

    def geometry(self, value, nested: bool) -> None:
        if not isinstance(value, dict) or not isinstance(value.get("type"), str):
            raise GeometryError("intersects must be a GeoJSON geometry object with a type and coordinates")
        kind = value["type"]
        if kind in ("Feature", "FeatureCollection"):
            raise GeometryError(f"intersects must be a GeoJSON geometry, not a {kind} (give its geometry)")
        if kind not in TYPES:
            raise GeometryError(f"intersects has an unknown geometry type {kind!r}; known: {list(TYPES)}")
        if kind == "GeometryCollection":
            if nested:
                raise GeometryError("a GeometryCollection inside a GeometryCollection is not supported")
            members = value.get("geometries")
            if not isinstance(members, list) or not members:
                raise GeometryError("a GeometryCollection needs a non-empty array of geometries")
            for member in members:
                self.geometry(member, nested=True)
            return
        coordinates = value.get("coordinates")
        if kind == "Point":
            self.point(coordinates)
        elif kind == "MultiPoint":
            for position in self._array(coordinates, kind, "an array of positions"):
                self.point(position)
        elif kind == "LineString":
            self.line(coordinates)
        elif kind == "MultiLineString":
            for line in self._array(coordinates, kind, "an array of LineString coordinate arrays"):
                self.line(line)
        elif kind == "Polygon":
            self.polygon(coordinates)
        else:
            for polygon in self._array(coordinates, kind, "an array of Polygon coordinate arrays"):
                self.polygon(polygon)

    @staticmethod
    def _array(value, kind: str, what: str) -> list:
        if not isinstance(value, list) or not value:
            raise GeometryError(f"a {kind}'s coordinates must be {what} (non-empty), got {_short(value)}")
        return value

    def position(self, value) -> tuple[float, float]:
        if (not isinstance(value, list) or len(value) not in (2, 3)
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
            raise GeometryError(f"a GeoJSON position is [longitude, latitude] (or with an altitude), "
                                f"got {_short(value)}")
        lon, lat = float(value[0]), float(value[1])
        if not (math.isfinite(lon) and math.isfinite(lat) and -180 <= lon <= 180 and -90 <= lat <= 90):
            raise GeometryError(f"position {_short(value)}: longitude must lie in [-180, 180] and latitude in "
                                "[-90, 90] (WGS84 degrees)")
        self.positions += 1
        if self.positions > MAX_POSITIONS:
            raise GeometryError(f"intersects has more than {MAX_POSITIONS} positions; simplify it")
        return lon, lat

    def point(self, value) -> None:
        x, y = self.position(value)
        self.segments.append((x, y, x, y))

    def _path(self, value, kind: str, least: int) -> list[tuple[float, float]]:
        if not isinstance(value, list) or len(value) < least:
            raise GeometryError(f"a {kind} needs at least {least} positions, got {_short(value)}")
        return [self.position(p) for p in value]

    def line(self, value) -> None:
        path = self._path(value, "LineString", 2)
        self.segments += [(*a, *b) for a, b in zip(path, path[1:])]

    def polygon(self, value) -> None:
        rings = self._array(value, "Polygon", "an array of linear rings (the outer one, then holes)")
        first = len(self.segments)
        for n, ring in enumerate(rings):
            path = self._path(ring, "linear ring", 4)
            if path[0] != path[-1]:
                raise GeometryError(f"a Polygon's linear ring must be closed (its last position the same as its "
                                    f"first); ring {n} is not")
            self.segments += [(*a, *b) for a, b in zip(path, path[1:])]
        self.polygons.append((first, len(self.segments)))


def _short(value) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
