"""Rate-distortion frontiers of a set of trained models (pure numpy).

Each trained model is one point (R, D) in nats. A point is on the R-D frontier (Pareto-optimal)
when no other point has both a lower-or-equal rate and a lower-or-equal distortion, one of them
strictly. The lower convex hull of the frontier holds the points that minimise the paper's
objective D + beta * R for some beta > 0 (Sec. 3): the only points a beta sweep can reach
when training finds the optimum; points on the frontier but above the hull are still
achievable, just not as the optimum of any single beta.

Two methods' curves are compared by `curve_gap`, the analogue of the Bjontegaard delta used for
image codecs: the mean vertical distance between their lower convex hulls (distortion at equal
rate) and the mean horizontal one (rate at equal distortion) over the range both cover, and
`bootstrap_curve_gap` gives it an interval from the seeds.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

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


def hull_curve(rate, distortion) -> tuple[np.ndarray, np.ndarray]:
    """The lower convex hull as a curve: its points' (rate, distortion), sorted by rate. Along
    it the rate rises strictly and the distortion falls strictly (see `rd_frontier`)."""
    r, d = _points(rate, distortion)
    on = lower_convex_hull(r, d)
    order = np.argsort(r[on], kind="stable")
    return r[on][order], d[on][order]


def _mean_difference(xa: np.ndarray, ya: np.ndarray, xb: np.ndarray, yb: np.ndarray):
    """(mean of f_a - f_b, low, high) over the x-range both cover, where f is the piecewise
    linear curve through (x, y) with x increasing; exact (the difference is piecewise linear
    between the union of both curves' breakpoints, so the trapezoid rule integrates it without
    error). None when the ranges overlap in at most a point."""
    if len(xa) < 2 or len(xb) < 2:
        return None
    low, high = max(xa[0], xb[0]), min(xa[-1], xb[-1])
    if not high > low:
        return None
    grid = np.unique(np.concatenate([[low, high], xa, xb]))
    grid = grid[(grid >= low) & (grid <= high)]
    diff = np.interp(grid, xa, ya) - np.interp(grid, xb, yb)
    area = np.sum((diff[1:] + diff[:-1]) * np.diff(grid)) / 2
    return float(area / (high - low)), float(low), float(high)


@dataclass(frozen=True)
class CurveGap:
    """Curve a against curve b (nats); negative gaps: a is better.

    distortion_gap: mean of D_a(R) - D_b(R) over R in [rate_low, rate_high];
    rate_gap: mean of R_a(D) - R_b(D) over D in [distortion_low, distortion_high].
    A gap whose ranges do not overlap is NaN (and its range NaN)."""
    distortion_gap: float
    rate_low: float
    rate_high: float
    rate_gap: float
    distortion_low: float
    distortion_high: float


def curve_gap(rate_a, distortion_a, rate_b, distortion_b) -> CurveGap | None:
    """How far curve a lies from curve b: both as their lower convex hulls (the points some beta
    makes optimal, joined by straight lines, which a mix of the two neighbouring models also
    achieves), compared over the range both cover. None if they share neither a rate nor a
    distortion range (e.g. a single point each)."""
    ra, da = hull_curve(rate_a, distortion_a)
    rb, db = hull_curve(rate_b, distortion_b)
    at_rate = _mean_difference(ra, da, rb, db)
    # R as a function of D: the hull's distortion falls strictly, so reversed it rises.
    at_distortion = _mean_difference(da[::-1], ra[::-1], db[::-1], rb[::-1])
    if at_rate is None and at_distortion is None:
        return None
    nan3 = (math.nan, math.nan, math.nan)
    return CurveGap(*(at_rate or nan3), *(at_distortion or nan3))


def bootstrap_curve_gap(rate_a, distortion_a, rate_b, distortion_b, *, resamples: int = 2000,
                        level: float = 0.95, seed: int = 0) -> dict:
    """`curve_gap` between two methods trained with several seeds, with a bootstrap interval.

    rate_x, distortion_x: arrays [seeds, points] (point j = the same setting, e.g. the same
    beta, in every seed; NaN where that seed's run failed). A curve is the per-point mean over
    seeds. The estimate uses every seed; each of `resamples` replicates draws each method's
    seeds with replacement (independently: the two methods' runs are not paired) and
    recomputes the gap. Returns the CurveGap fields, `<gap>_low` / `<gap>_high` (the
    percentile interval at `level`; NaN when both methods have one seed, as then there is no
    spread to resample), and the seed counts."""
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    runs = []
    for name, rate, distortion in (("a", rate_a, distortion_a), ("b", rate_b, distortion_b)):
        r, d = np.atleast_2d(np.asarray(rate, float)), np.atleast_2d(np.asarray(distortion, float))
        if r.shape != d.shape:
            raise ValueError(f"rate_{name} and distortion_{name} must have the same shape "
                             f"[seeds, points], got {r.shape} and {d.shape}")
        runs.append((r, d))

    def mean_curve(r, d, rows):
        # numpy warns "Mean of empty slice" for a point that failed in every drawn seed; it
        # stays NaN and the hull ignores it, so the warning says nothing the result does not.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(r[rows], 0), np.nanmean(d[rows], 0)

    def gap(rows_a, rows_b):
        return curve_gap(*mean_curve(*runs[0], rows_a), *mean_curve(*runs[1], rows_b))

    (ra, _), (rb, _) = runs
    estimate = gap(np.arange(len(ra)), np.arange(len(rb)))
    if estimate is None:
        return {}
    out = {**estimate.__dict__, "seeds_a": len(ra), "seeds_b": len(rb)}
    fields = ("distortion_gap", "rate_gap")
    for name in fields:
        out[f"{name}_low"] = out[f"{name}_high"] = math.nan
    if len(ra) == 1 and len(rb) == 1:
        return out
    rng = np.random.default_rng(seed)
    samples = {name: [] for name in fields}
    for _ in range(resamples):
        g = gap(rng.integers(len(ra), size=len(ra)), rng.integers(len(rb), size=len(rb)))
        for name in fields:
            samples[name].append(getattr(g, name) if g is not None else math.nan)
    tail = 100 * (1 - level) / 2
    for name in fields:
        values = np.asarray(samples[name])
        values = values[np.isfinite(values)]
        if len(values):
            out[f"{name}_low"], out[f"{name}_high"] = (float(v) for v in
                                                       np.percentile(values, [tail, 100 - tail]))
    return out

