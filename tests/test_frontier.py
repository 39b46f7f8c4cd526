"""R-D frontier and lower convex hull on hand-made point sets, and against brute force."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from echo.frontier import lower_convex_hull, rd_frontier


def test_dominated_points_are_dropped():
    rate = [1.0, 2.0, 3.0, 2.5, 4.0]
    dist = [10.0, 6.0, 5.0, 7.0, 5.5]      # (2.5, 7) is dominated by (2, 6); (4, 5.5) by (3, 5)
    assert rd_frontier(rate, dist).tolist() == [True, True, True, False, False]


def test_ties_keep_one_point_and_the_better_coordinate():
    rate = [1.0, 1.0, 2.0, 2.0, 3.0, 4.0]
    dist = [9.0, 9.0, 5.0, 6.0, 4.0, 4.0]
    # Identical (1, 9): the first is kept. Equal rate 2: the lower distortion wins.
    # Equal distortion 4: the lower rate wins.
    assert rd_frontier(rate, dist).tolist() == [True, False, True, False, True, False]


def test_non_finite_points_are_never_on_the_frontier():
    rate = [np.nan, 1.0, 0.5, np.inf]
    dist = [0.0, 3.0, -np.inf, 0.0]
    assert rd_frontier(rate, dist).tolist() == [False, True, False, False]
    assert lower_convex_hull(rate, dist).tolist() == [False, True, False, False]


def test_hull_drops_frontier_points_above_a_chord():
    rate = [0.0, 1.0, 2.0, 3.0, 5.0]
    dist = [10.0, 5.0, 4.0, 0.0, 1.0]
    # (2, 4) is Pareto-optimal but above the chord (1, 5)-(3, 0) (2.5 at rate 2);
    # (5, 1) is dominated by (3, 0).
    assert rd_frontier(rate, dist).tolist() == [True, True, True, True, False]
    assert lower_convex_hull(rate, dist).tolist() == [True, True, False, True, False]


def test_collinear_points_lie_on_the_hull():
    rate = [3.0, 0.0, 1.0, 2.0]             # unsorted on purpose
    dist = [0.0, 3.0, 2.0, 1.0]
    assert lower_convex_hull(rate, dist).all()


def test_single_and_empty_point_sets():
    assert rd_frontier([2.0], [3.0]).tolist() == [True]
    assert lower_convex_hull([2.0], [3.0]).tolist() == [True]
    assert rd_frontier([], []).tolist() == []
    with pytest.raises(ValueError, match="same length"):
        rd_frontier([1.0, 2.0], [1.0])


points = st.lists(st.tuples(st.integers(0, 12), st.integers(0, 12)), min_size=1, max_size=25)


@settings(max_examples=200, deadline=None)
@given(points)
def test_frontier_matches_brute_force_dominance(pts):
    rate, dist = (np.array(c, dtype=float) for c in zip(*pts))
    mask = rd_frontier(rate, dist)
    for i in range(len(pts)):
        dominated = any((rate[j] <= rate[i] and dist[j] <= dist[i]
                         and (rate[j] < rate[i] or dist[j] < dist[i])) for j in range(len(pts)))
        duplicate_before = any(rate[j] == rate[i] and dist[j] == dist[i] for j in range(i))
        assert mask[i] == (not dominated and not duplicate_before)
    # Sorted by rate the frontier is strictly decreasing in distortion.
    order = np.argsort(rate[mask])
    assert np.all(np.diff(dist[mask][order]) < 0)


@settings(max_examples=200, deadline=None)
@given(points)
def test_hull_matches_brute_force_chords(pts):
    """A frontier point is on the lower hull iff it lies on or below every chord between two
    frontier points on either side of it (the minimisers of D + beta R, beta >= 0)."""
    rate, dist = (np.array(c, dtype=float) for c in zip(*pts))
    front = np.flatnonzero(rd_frontier(rate, dist))
    hull = lower_convex_hull(rate, dist)
    assert not np.any(hull & ~rd_frontier(rate, dist))
    for i in front:
        above_a_chord = any(
            dist[i] > dist[j] + (dist[k] - dist[j]) * (rate[i] - rate[j]) / (rate[k] - rate[j])
            for j in front for k in front if rate[j] < rate[i] < rate[k])
        assert hull[i] == (not above_a_chord)
