"""From evaluated trials to R-D points: one point per (method, arch, latent_dim, beta), the mean
over its seeds with its standard error.

    trials = seed_trials(evaluation)   # one trial per point and seed
    points = seed_points(evaluation)   # one row per point: means, `<metric>_sem`, `n_seeds`

Each seed contributes one trial per point: with Optuna samples (sweep.search.num_samples > 1)
the one with the lowest test objective D + beta R, the quantity training minimised. The spread
is the standard error of the mean over seeds, sd / sqrt(n) with the n - 1 sd (NaN for one seed):
a point's 95% interval is about mean +- 2 sem for many seeds and wider for few (t quantile 12.7
for 2 seeds, 4.3 for 3), which is why table.md prints the seed count beside every spread.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.records import TrialStatus

SERIES_KEYS = ["method", "arch", "latent_dim"]
POINT_KEYS = [*SERIES_KEYS, "beta"]
AVERAGED = ("rate", "distortion", "neg_elbo", "iwae_neg_log_lik")
POINT_COLUMNS = ["series", *POINT_KEYS, "n_seeds", "seeds",
                 *[c for name in AVERAGED for c in (name, f"{name}_sem")],
                 "rate_kind", "iwae_k", "low_rate_limit", "trial_id", "trial_ids", "checkpoint"]


def completed(evaluation: pd.DataFrame) -> pd.DataFrame:
    """Completed trials with finite test metrics (the points a frontier is made of)."""
    ok = (evaluation["status"] == TrialStatus.COMPLETED) \
        & np.isfinite(evaluation["rate"].astype(float)) \
        & np.isfinite(evaluation["distortion"].astype(float))
    return evaluation[ok]


def series_labels(table: pd.DataFrame) -> pd.Series:
    """The method name, with arch and latent size appended only when the sweep varies them."""
    label = table["method"].astype(str)
    if table["arch"].nunique() > 1:
        label = label + " " + table["arch"].astype(str)
    if table["latent_dim"].nunique() > 1:
        label = label + " z" + table["latent_dim"].astype(str)
    return label


def seed_trials(evaluation: pd.DataFrame) -> pd.DataFrame:
    """The completed trial that stands for each (point, seed), with a `series` column."""
    done = completed(evaluation).copy()
    if done.empty:
        return done.assign(series=pd.Series(dtype=str))
    done["series"] = series_labels(done)
    objective = done["distortion"].astype(float) + done["beta"].astype(float) * done["rate"]
    best = objective.groupby([done[k] for k in (*POINT_KEYS, "seed")], sort=False).idxmin()
    return done.loc[best.to_numpy()]


def _sem(values: pd.Series) -> float:
    values = values.astype(float).dropna()
    return float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else np.nan


def seed_points(evaluation: pd.DataFrame) -> pd.DataFrame:
    """One row per point (POINT_COLUMNS), in sweep order: the mean over seeds of each metric,
    its standard error `<metric>_sem`, the seed count, and the lowest seed's trial (its
    checkpoint is the one shown in reconstructions)."""
    trials = seed_trials(evaluation)
    rows = []
    for _, group in trials.groupby(POINT_KEYS, sort=False):
        group = group.sort_values("seed")
        first = group.iloc[0]
        row = {"series": first["series"], **{k: first[k] for k in POINT_KEYS},
               "n_seeds": len(group), "seeds": " ".join(str(int(s)) for s in group["seed"])}
        for name in AVERAGED:
            row[name] = float(group[name].astype(float).mean())
            row[f"{name}_sem"] = _sem(group[name])
        row.update(rate_kind=first["rate_kind"], iwae_k=first["iwae_k"],
                   low_rate_limit=float(group["low_rate_limit"].astype(float).mean()),
                   trial_id=first["trial_id"], trial_ids=" ".join(group["trial_id"]),
                   checkpoint=first["checkpoint"])
        rows.append(row)
    return pd.DataFrame(rows, columns=POINT_COLUMNS)


def best_at_beta(evaluation: pd.DataFrame, beta: float) -> pd.DataFrame:
    """Per method (index), the point at `beta` with the lowest mean test -ELBO over its seeds
    (several points when the sweep also varies the architecture or latent size)."""
    points = seed_points(evaluation)
    points = points[np.isclose(points["beta"].astype(float), beta)
                    & np.isfinite(points["neg_elbo"].astype(float))]
    if points.empty:
        return points.set_index("method")
    best = points.loc[points.groupby("method", sort=False)["neg_elbo"].idxmin()]
    return best.set_index("method")
