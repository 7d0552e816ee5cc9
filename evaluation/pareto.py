"""The Pareto front of the report's code-length dial: which configurations no other beats on every
axis at once (higher mAP, fewer bytes per item, lower latency, less energy per 1,000 queries)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

# Axis -> +1 where more is better, -1 where less is.
AXES = {"map_all": +1, "bytes_per_item": -1, "latency_ms_p50": -1, "energy_wh_per_1k_queries": -1}


def dominates(a: Mapping, b: Mapping, axes: Mapping[str, int]) -> bool:
    """Whether ``a`` is at least as good as ``b`` on every axis and better on one."""
    better = False
    for axis, sense in axes.items():
        x, y = sense * a[axis], sense * b[axis]
        if x < y:
            return False
        better |= x > y
    return better


def non_dominated(points: Sequence[Mapping], axes: Mapping[str, int] = AXES) -> list[bool]:
    """For each point (a mapping with every axis), whether no other point dominates it. Points with
    a missing axis (None) are left off the front."""
    usable = [all(p.get(axis) is not None for axis in axes) for p in points]
    return [ok and not any(u and dominates(q, p, axes) for q, u in zip(points, usable) if q is not p)
            for p, ok in zip(points, usable)]
