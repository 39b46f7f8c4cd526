"""Per-method rate-distortion frontiers of the evaluated sweep (results/frontier.csv).

A series is one method at one architecture and latent size (the paper's curves are per method
at a fixed architecture); its frontier holds the Pareto-optimal (rate, distortion) points of the
series' completed trials, each flagged whether it lies on the lower convex hull.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from echo.frontier import lower_convex_hull, rd_frontier

SERIES_KEYS = ["method", "arch", "latent_dim"]
FRONTIER_COLUMNS = ["series", *SERIES_KEYS, "trial_id", "beta", "rate", "distortion", "neg_elbo",
                    "iwae_neg_log_lik", "on_hull", "checkpoint"]


def completed(evaluation: pd.DataFrame) -> pd.DataFrame:
    """Completed trials with finite test metrics (the points a frontier is made of)."""
    ok = (evaluation["status"] == "completed") \
        & np.isfinite(evaluation["rate"].astype(float)) \
        & np.isfinite(evaluation["distortion"].astype(float))
    return evaluation[ok]


def excluded(evaluation: pd.DataFrame) -> pd.DataFrame:
    """Trials left out of every frontier (nonfinite, failed, or non-finite test metrics)."""
    return evaluation.drop(completed(evaluation).index)


def exclusion_reason(trial: pd.Series) -> str:
    """Why an excluded trial is not on any frontier: the sweep's error, else its metrics."""
    error = trial["error"]
    return error if isinstance(error, str) and error else "non-finite test metrics"


def series_labels(table: pd.DataFrame) -> pd.Series:
    """The method name, with arch and latent size appended only when the sweep varies them."""
    label = table["method"].astype(str)
    if table["arch"].nunique() > 1:
        label = label + " " + table["arch"].astype(str)
    if table["latent_dim"].nunique() > 1:
        label = label + " z" + table["latent_dim"].astype(str)
    return label


def frontier_table(evaluation: pd.DataFrame) -> pd.DataFrame:
    """Frontier points of every series, sorted by series (in sweep order) and rate."""
    points = completed(evaluation).copy()
    points["series"] = series_labels(points) if len(points) else pd.Series(dtype=str)
    parts = []
    for _, group in points.groupby("series", sort=False):
        rate = group["rate"].to_numpy(float)
        distortion = group["distortion"].to_numpy(float)
        front = group.assign(on_hull=lower_convex_hull(rate, distortion))[rd_frontier(rate, distortion)]
        parts.append(front.sort_values("rate"))
    if not parts:
        return pd.DataFrame(columns=FRONTIER_COLUMNS)
    return pd.concat(parts, ignore_index=True)[FRONTIER_COLUMNS]
