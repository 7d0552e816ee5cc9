"""GeoJSON geometries as a place filter (serving/index/geometry.py): reading them, and which footprint boxes
they meet, by hand and against a plain reference on random shapes; ItemFilter's intersects."""
import json
import random

import numpy as np
import pytest

from serving.index.geometry import GeometryError, MAX_POSITIONS, parse_geometry
from serving.index.items import FilterError, ItemFilter, metadata_columns


def meets(geometry: dict, *boxes) -> list[bool]:
    """Which of ``boxes`` ([west, south, east, north]) ``geometry`` meets."""
    west, south, east, north = np.array(boxes, dtype=float).T
    return parse_geometry(geometry).meets(west, south, east, north).tolist()


def ring(west, south, east, north) -> list[list[float]]:
    return [[west, south], [east, south], [east, north], [west, north], [west, south]]


BOX = [0, 0, 1, 1]


def test_points_meet_the_boxes_they_lie_in_edges_included():
    point = {"type": "Point", "coordinates": [0.5, 0.5]}
    assert meets(point, BOX, [0.5, 0.5, 2, 2], [0.6, 0, 1, 1], [-1, -1, 0.4, 0.4]) == [True, True, False, False]
    many = {"type": "MultiPoint", "coordinates": [[5, 5], [0.2, 0.9, 100.0]]}  # an altitude is allowed
    assert meets(many, BOX, [4, 4, 6, 6], [2, 2, 3, 3]) == [True, True, False]


def test_lines_crossing_a_box_without_a_vertex_in_it_meet_it():
    across = {"type": "LineString", "coordinates": [[-1, 0.5], [2, 0.5]]}  # through the box, ends outside
    diagonal = {"type": "LineString", "coordinates": [[-1, 1.5], [1.5, -1]]}  # cuts the lower left corner
    assert meets(across, BOX, [0, 0.6, 1, 1]) == [True, False]
    assert meets(diagonal, BOX, [0.8, 0.8, 1, 1]) == [True, False]
    touching = {"type": "LineString", "coordinates": [[-1, 3], [3, -1]]}  # x + y = 2: the corner (1, 1) only
    assert meets(touching, BOX) == [True]
    lines = {"type": "MultiLineString", "coordinates": [[[5, -1], [5, 2]], [[-1, 3], [0, 4]]]}
    assert meets(lines, BOX, [4, 0, 6, 1], [-2, 2, 2, 3.5]) == [False, True, True]


def test_polygons_meet_the_boxes_they_contain_but_not_those_in_their_holes():
    square = {"type": "Polygon", "coordinates": [ring(-10, -10, 10, 10)]}
    assert meets(square, BOX, [20, 20, 21, 21], [9, 9, 11, 11], [-20, -20, 20, 20]) == [True, False, True, True]
    holed = {"type": "Polygon", "coordinates": [ring(-10, -10, 10, 10), ring(-5, -5, 5, 5)]}
    assert meets(holed, BOX, [6, 6, 7, 7], [4, 4, 6, 6], [-6, -6, 6, 6]) == [False, True, True, True]
    triangle = {"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [0, 10], [0, 0]]]}
    assert meets(triangle, [1, 1, 2, 2], [6, 6, 7, 7]) == [True, False]  # its box holds both, it the first
    two = {"type": "MultiPolygon", "coordinates": [[ring(-10, -10, -5, -5)], [ring(5, 5, 10, 10)]]}
    assert meets(two, BOX, [6, 6, 7, 7], [-7, -7, -6, -6]) == [False, True, True]
    mixed = {"type": "GeometryCollection", "geometries": [{"type": "Point", "coordinates": [0.5, 0.5]}, holed]}
    assert meets(mixed, BOX, [6, 6, 7, 7], [2, 2, 3, 3]) == [True, True, False]


def test_boxes_across_the_antimeridian_are_both_of_their_halves():
    across = [170, -1, -170, 1]  # [170, 180] and [-180, -170]
    for lon, hit in ((175, True), (-175, True), (180, True), (-180, True), (0, False), (-160, False)):
        assert meets({"type": "Point", "coordinates": [lon, 0]}, across) == [hit], lon
    west_side = {"type": "LineString", "coordinates": [[-175, -5], [-175, 5]]}  # crosses the eastern half
    assert meets(west_side, across, [-174, 2, -172, 3]) == [True, False]
    cut = {"type": "MultiPolygon", "coordinates": [[ring(160, -10, 180, 10)], [ring(-180, -10, -160, 10)]]}
    assert meets(cut, across, [-165, -5, -162, 5], [0, 0, 1, 1]) == [True, True, False]
    assert parse_geometry(cut).bbox == (-180, -10, 180, 10)


def _cross(o, a, b) -> float:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def _segments_cross(p, q, r, s) -> bool:
    """Whether segments pq and rs share a point (orientations, collinear overlaps included)."""
    def on(a, b, c):
        return min(a[0], b[0]) <= c[0] <= max(a[0], b[0]) and min(a[1], b[1]) <= c[1] <= max(a[1], b[1])
    d1, d2, d3, d4 = _cross(r, s, p), _cross(r, s, q), _cross(p, q, r), _cross(p, q, s)
    if ((d1 > 0) != (d2 > 0)) and d1 and d2 and ((d3 > 0) != (d4 > 0)) and d3 and d4:
        return True
    return any(d == 0 and on(a, b, c) for d, a, b, c in ((d1, r, s, p), (d2, r, s, q), (d3, p, q, r), (d4, p, q, s)))


def _inside(point, rings) -> bool:
    inside = False
    for ring_ in rings:
        for (x1, y1), (x2, y2) in zip(ring_, ring_[1:]):
            if (y1 > point[1]) != (y2 > point[1]) and point[0] < x1 + (point[1] - y1) * (x2 - x1) / (y2 - y1):
                inside = not inside
    return inside


def reference(rings, box) -> bool:
    """A polygon meets a box: a vertex in the box, a box corner in the polygon, or an edge crossing a side."""
    w, s, e, n = box
    corners = [(w, s), (e, s), (e, n), (w, n)]
    sides = list(zip(corners, corners[1:] + corners[:1]))
    vertices = [v for r in rings for v in r]
    edges = [(a, b) for r in rings for a, b in zip(r, r[1:])]
    return (any(w <= x <= e and s <= y <= n for x, y in vertices) or any(_inside(c, rings) for c in corners)
            or any(_segments_cross(a, b, c, d) for a, b in edges for c, d in sides))


def test_random_polygons_and_boxes_agree_with_a_plain_reference():
    rng = random.Random(7)
    for _ in range(40):
        cx, cy, size = rng.uniform(-20, 20), rng.uniform(-20, 20), rng.uniform(1, 15)
        star = [[cx + size * rng.uniform(0.3, 1) * np.cos(a), cy + size * rng.uniform(0.3, 1) * np.sin(a)]
                for a in np.linspace(0, 2 * np.pi, rng.randint(3, 9), endpoint=False)]
        hole = [[cx + 0.2 * size * np.cos(a), cy + 0.2 * size * np.sin(a)] for a in np.linspace(0, 2 * np.pi, 5)[:-1]]
        rings = [star + star[:1], hole + hole[:1]]  # a star around its centre, a small hole at the centre
        boxes = []
        for _ in range(60):
            w, s = rng.uniform(-40, 40), rng.uniform(-40, 40)
            boxes.append([w, s, w + rng.uniform(0, 10), s + rng.uniform(0, 10)])
        got = meets({"type": "Polygon", "coordinates": rings}, *boxes)
        assert got == [reference(rings, box) for box in boxes]


@pytest.mark.parametrize("value, says", [
    ("{not json", "JSON text"), ([1, 2], "geometry object"), ({"coordinates": [1, 2]}, "geometry object"),
    ({"type": "Feature", "geometry": None}, "not a Feature"), ({"type": "Circle"}, "unknown geometry type"),
    ({"type": "Point", "coordinates": [1]}, "position"), ({"type": "Point", "coordinates": [200, 0]}, "[-180, 180]"),
    ({"type": "Point", "coordinates": [0, 91]}, "[-90, 90]"), ({"type": "Point", "coordinates": ["1", 2]}, "position"),
    ({"type": "Point", "coordinates": [True, 2]}, "position"), ({"type": "Point"}, "position"),
    ({"type": "MultiPoint", "coordinates": []}, "non-empty"),
    ({"type": "LineString", "coordinates": [[0, 0]]}, "at least 2"),
    ({"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 1]]]}, "closed"),
    ({"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [0, 0]]]}, "at least 4"),
    ({"type": "Polygon", "coordinates": []}, "non-empty"), ({"type": "MultiPolygon", "coordinates": [[]]}, "non-empty"),
    ({"type": "GeometryCollection", "geometries": []}, "non-empty"),
    ({"type": "GeometryCollection", "geometries": [{"type": "GeometryCollection", "geometries": []}]}, "inside"),
    ({"type": "MultiPoint", "coordinates": [[0, 0]] * (MAX_POSITIONS + 1)}, "simplify"),
])
def test_bad_geometries_are_refused_saying_why(value, says):
    with pytest.raises(GeometryError) as err:
        parse_geometry(value)
    assert says in str(err.value)


def test_an_item_filter_with_a_geometry_tests_what_passes_its_box():
    columns = metadata_columns([{"bbox": [0, 0, 1, 1], "datetime": "2024-06-01T00:00:00Z"},
                                {"bbox": [8, 8, 9, 9], "datetime": "2024-06-01T00:00:00Z"},  # in the box, off the line
                                {"bbox": [9, 0, 10, 1]}, {}])
    line = {"type": "LineString", "coordinates": [[0.5, 0.5], [9.5, 0.5], [9.5, 9.9]]}
    where = ItemFilter.parse(intersects=json.dumps(line))  # a query string's JSON text, or the object
    assert where == ItemFilter.parse(intersects=line) and where.bbox == (0.5, 0.5, 9.5, 9.9)
    assert where.mask(columns, 4).tolist() == [True, False, True, False]
    timed = ItemFilter.parse(datetime="2024-06-01", intersects=line)
    assert timed.mask(columns, 4).tolist() == [True, False, False, False]
    with pytest.raises(FilterError) as err:
        ItemFilter.parse(bbox=[0, 0, 1, 1], intersects=line)
    assert err.value.field == "intersects" and "exclude" in str(err.value)
    with pytest.raises(FilterError) as err:
        ItemFilter.parse(intersects={"type": "Point", "coordinates": [0, 100]})
    assert err.value.field == "intersects"
