"""Per-method rate-distortion frontiers of the evaluated sweep (results/frontier.csv).

A series is one method at one architecture and latent size (the paper's curves are per method
at a fixed architecture). Its points are the seed means of `pipeline.results.aggregate.seed_points`;
its frontier holds the Pareto-optimal ones, each flagged whether it lies on the lower convex
hull, with the spreads over seeds and the kind of its rate.
"""
from __future__ import annotations

import pandas as pd

from echo.frontier import lower_convex_hull, rd_frontier
from pipeline.results.aggregate import POINT_COLUMNS, completed, seed_points

FRONTIER_COLUMNS = [*POINT_COLUMNS, "on_hull"]


def excluded(evaluation: pd.DataFrame) -> pd.DataFrame:
    """Trials left out of every frontier (nonfinite, failed, or non-finite test metrics)."""
    return evaluation.drop(completed(evaluation).index)


def exclusion_reason(trial: pd.Series) -> str:
    """Why an excluded trial is not on any frontier: the sweep's error, else its metrics."""
    error = trial["error"]
    return error if isinstance(error, str) and error else "non-finite test metrics"


def frontier_table(evaluation: pd.DataFrame) -> pd.DataFrame:
    """Frontier points of every series, sorted by series (in sweep order) and rate."""
    points = seed_points(evaluation)
    parts = []
    for _, group in points.groupby("series", sort=False):
        rate = group["rate"].to_numpy(float)
        distortion = group["distortion"].to_numpy(float)
        front = group.assign(on_hull=lower_convex_hull(rate, distortion))[rd_frontier(rate, distortion)]
        parts.append(front.sort_values("rate"))
    if not parts:
        return pd.DataFrame(columns=FRONTIER_COLUMNS)
    return pd.concat(parts, ignore_index=True)[FRONTIER_COLUMNS]
