"""Masks and zones of a camera: polygons in relative coordinates (0-1 of the width and height, so
they survive a resolution change). Pure geometry and its settings; the raster that the motion
detector uses is made in cameras/motion.py.
"""

from __future__ import annotations

from typing import Any, Sequence

from pydantic import Field, field_validator

from edge_agent.settings.base import StrictModel

Point = tuple[float, float]
Polygon = tuple[Point, ...]
Box = tuple[float, float, float, float]  # x0, y0, x1, y1, relative
# Added on each side of a zone's bounding box before a crop: a person standing at the zone's edge
# is cut in half without it, and the model needs some context around the object to name it.
CROP_MARGIN = 0.1  # of the box's own width/height
MIN_CROP = 0.02  # a crop never narrower than this share of the frame (a zone drawn as a sliver)


def check_polygon(points: Any) -> Polygon:
    """A closed simple polygon of 3 or more [x, y] points within 0-1; ValueError naming the problem."""
    if not isinstance(points, (list, tuple)) or len(points) < 3:
        raise ValueError("a polygon needs at least 3 points [x, y]")
    out: list[Point] = []
    for index, point in enumerate(points):
        if not isinstance(point, (list, tuple)) or len(point) != 2 \
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in point):
            raise ValueError(f"point {index} must be [x, y] numbers")
        x, y = float(point[0]), float(point[1])
        if not (0.0 <= x <= 1.0 and 0.0 <= y <= 1.0):
            raise ValueError(f"point {index} [{x:g}, {y:g}] is outside 0-1 (coordinates are relative "
                             f"to the width and height)")
        out.append((x, y))
    crossing = _first_crossing(out)
    if crossing is not None:
        raise ValueError(f"the polygon crosses itself (edges {crossing[0]} and {crossing[1]})")
    if abs(_area(out)) < 1e-9:
        raise ValueError("the polygon has no area (its points are on one line)")
    return tuple(out)


def _area(points: Sequence[Point]) -> float:
    return sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(points, [*points[1:], points[0]])) / 2


def _first_crossing(points: Sequence[Point]) -> tuple[int, int] | None:
    """Two edges that are not neighbours and touch or cross; edge i runs from point i to i+1."""
    count = len(points)
    edges = [(points[i], points[(i + 1) % count]) for i in range(count)]
    for i in range(count):
        for j in range(i + 1, count):
            if j == i + 1 or (i == 0 and j == count - 1):
                continue  # neighbours share a point
            if _segments_meet(*edges[i], *edges[j]):
                return i, j
    return None


def _segments_meet(a: Point, b: Point, c: Point, d: Point) -> bool:
    def side(p: Point, q: Point, r: Point) -> float:
        return (q[0] - p[0]) * (r[1] - p[1]) - (q[1] - p[1]) * (r[0] - p[0])

    def within(p: Point, q: Point, r: Point) -> bool:  # r on segment pq, given collinear
        return min(p[0], q[0]) <= r[0] <= max(p[0], q[0]) and min(p[1], q[1]) <= r[1] <= max(p[1], q[1])

    d1, d2, d3, d4 = side(c, d, a), side(c, d, b), side(a, b, c), side(a, b, d)
    if ((d1 > 0 > d2) or (d1 < 0 < d2)) and ((d3 > 0 > d4) or (d3 < 0 < d4)):
        return True
    return any(s == 0 and within(p, q, r) for s, p, q, r in
               ((d1, c, d, a), (d2, c, d, b), (d3, a, b, c), (d4, a, b, d)))


def bounding_box(polygon: Polygon) -> Box:
    xs, ys = [x for x, _ in polygon], [y for _, y in polygon]
    return min(xs), min(ys), max(xs), max(ys)


def crop_box(polygon: Polygon, margin: float = CROP_MARGIN) -> Box:
    """The zone's bounding box grown by `margin` of its size on each side, clipped to the frame."""
    x0, y0, x1, y1 = bounding_box(polygon)
    grow_x = max((x1 - x0) * margin, (MIN_CROP - (x1 - x0)) / 2)
    grow_y = max((y1 - y0) * margin, (MIN_CROP - (y1 - y0)) / 2)
    return (round(max(0.0, x0 - grow_x), 6), round(max(0.0, y0 - grow_y), 6),
            round(min(1.0, x1 + grow_x), 6), round(min(1.0, y1 + grow_y), 6))


class ZoneSettings(StrictModel):
    """`[cameras.<name>.zones.<zone>]`: a region whose motion is tracked and published on its own."""

    polygon: Polygon = Field(description="[[x, y], ...]: 3 or more points, relative (0-1) to the "
                             "frame's width and height, not crossing itself")

    @field_validator("polygon", mode="before")
    @classmethod
    def _simple(cls, value: Any) -> Polygon:
        return check_polygon(value)


def check_mask(value: Any) -> tuple[Polygon, ...]:
    """`mask = [[[x, y], ...], ...]`: polygons where motion never counts."""
    if not isinstance(value, (list, tuple)):
        raise ValueError("mask must be a list of polygons [[[x, y], ...], ...]")
    polygons = []
    for index, polygon in enumerate(value):
        try:
            polygons.append(check_polygon(polygon))
        except ValueError as exc:
            raise ValueError(f"mask polygon {index}: {exc}") from None
    return tuple(polygons)
