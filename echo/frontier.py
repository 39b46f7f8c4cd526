"""Rate-distortion frontiers of a set of trained models (pure numpy).

Each trained model is one point (R, D) in nats. A point is on the R-D frontier (Pareto-optimal)
when no other point has both a lower-or-equal rate and a lower-or-equal distortion, one of them
strictly. The lower convex hull of the frontier holds the points that minimise the paper's
objective D + beta * R for some beta > 0 (Sec. 3): the only points a beta sweep can reach
when training finds the optimum; points on the frontier but above the hull are still
achievable, just not as the optimum of any single beta.
"""
from __future__ import annotations

import numpy as np


def _points(rate, distortion) -> tuple[np.ndarray, np.ndarray]:
    r = np.asarray(rate, dtype=float).reshape(-1)
    d = np.asarray(distortion, dtype=float).reshape(-1)
    if r.shape != d.shape:
        raise ValueError(f"rate and distortion must have the same length, got {r.size} and "
                         f"{d.size}")
    return r, d


def rd_frontier(rate, distortion) -> np.ndarray:
    """Boolean mask of the Pareto-optimal (rate, distortion) points.

    Ties: of identical points only the first is kept, and of points with equal rate (or equal
    distortion) only the one that is better in the other coordinate, so the frontier sorted by
    rate has strictly increasing rate and strictly decreasing distortion. NaN or infinite points
    (diverged trials) are never on the frontier.
    """
    r, d = _points(rate, distortion)
    mask = np.zeros(r.size, dtype=bool)
    finite = np.flatnonzero(np.isfinite(r) & np.isfinite(d))
    # Sort by rate, then distortion, then position (stable), and keep each point that lowers
    # the best distortion seen so far: everything before it has rate <= its rate.
    order = finite[np.lexsort((finite, d[finite], r[finite]))]
    best = np.inf
    for i in order:
        if d[i] < best:
            mask[i] = True
            best = d[i]
    return mask


def lower_convex_hull(rate, distortion) -> np.ndarray:
    """Boolean mask of the frontier points on the lower convex hull of the point set.

    Andrew's monotone chain over the frontier sorted by rate; points lying exactly on a hull
    edge count as on the hull (they also minimise D + beta * R for that edge's beta).
    """
    r, d = _points(rate, distortion)
    front = np.flatnonzero(rd_frontier(r, d))
    front = front[np.argsort(r[front], kind="stable")]
    hull: list[int] = []
    for i in front:
        # Pop the last point while it lies strictly above the chord from its predecessor to i.
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            cross = (r[b] - r[a]) * (d[i] - d[a]) - (d[b] - d[a]) * (r[i] - r[a])
            if cross < 0:
                hull.pop()
            else:
                break
        hull.append(i)
    mask = np.zeros(r.size, dtype=bool)
    mask[hull] = True
    return mask
