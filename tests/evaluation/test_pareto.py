"""The Pareto front against a brute-force definition on random points, and its small cases."""
import itertools

import numpy as np

from evaluation.pareto import AXES, dominates, non_dominated


def test_small_cases():
    axes = {"map_all": +1, "bytes_per_item": -1}
    points = [{"map_all": 0.9, "bytes_per_item": 16}, {"map_all": 0.8, "bytes_per_item": 8},
              {"map_all": 0.7, "bytes_per_item": 16}, {"map_all": 0.9, "bytes_per_item": 16},
              {"map_all": None, "bytes_per_item": 1}]
    # The two equal best points are both kept (neither beats the other); the unmeasured one is off.
    assert non_dominated(points, axes) == [True, True, False, True, False]
    assert dominates(points[0], points[2], axes) and not dominates(points[0], points[3], axes)


def test_the_front_is_what_no_other_point_beats_on_every_axis():
    rng = np.random.default_rng(0)
    points = [dict(zip(AXES, row)) for row in rng.integers(0, 4, (40, len(AXES))).astype(float)]
    front = non_dominated(points)
    for i, p in enumerate(points):
        beaten = any(all(AXES[a] * q[a] >= AXES[a] * p[a] for a in AXES) and any(q[a] != p[a] for a in AXES)
                     for q in points)
        assert front[i] == (not beaten)
    chosen = [p for p, keep in zip(points, front) if keep]
    assert chosen and not any(dominates(a, b, AXES) for a, b in itertools.permutations(chosen, 2))
