"""The sweep's answer in a few numbers, named once for DVC (metrics.json) and MLflow (the
sweep's parent run's metrics):

- `neg_elbo.<method>`: the best test -ELBO at beta = 1 (mean over seeds), nats;
- `D_gap.<a>_vs_<b>`: mean distortion of a's R-D curve minus b's at equal rate, nats
  (negative: a is better; pipeline.results.comparison), `R_gap.<a>_vs_<b>`: the rate gap at equal
  distortion.

metrics.json keeps it short, so that `dvc metrics show` fits a terminal: every method's
`neg_elbo` and the `D_gap` of the first series (an exact-rate one, Echo, when the sweep has one)
against each other. The parent run also holds every pair's `D_gap` and `R_gap`. Everything
else (R, D, standard errors, seed counts, ranges, intervals) is in results/evaluation.csv,
comparison.csv and table.md.
"""
from __future__ import annotations

import math

import pandas as pd


def _key(name) -> str:
    return str(name).replace(" ", "_")


def _short(value) -> float:
    """6 significant digits, as the CSVs hold them."""
    return float(f"{float(value):.6g}")


def best_neg_elbo(best: pd.DataFrame) -> dict[str, float]:
    """`neg_elbo.<method>` from pipeline.results.aggregate.best_at_beta's table (method index)."""
    return {f"neg_elbo.{_key(method)}": _short(row["neg_elbo"]) for method, row in best.iterrows()
            if math.isfinite(float(row["neg_elbo"]))}


def pair_gaps(comparison: pd.DataFrame, *, first_only: bool = False) -> dict[str, float]:
    """`D_gap.<a>_vs_<b>` and `R_gap.<a>_vs_<b>` of every pair of results/comparison.csv
    (finite ones); with first_only, only the D_gap of the first series' pairs."""
    out = {}
    if comparison.empty:
        return out
    first = comparison["series_a"].iloc[0]
    for _, row in comparison.iterrows():
        if first_only and row["series_a"] != first:
            continue
        pair = f"{_key(row['series_a'])}_vs_{_key(row['series_b'])}"
        for name, column in (("D_gap", "distortion_gap"), ("R_gap", "rate_gap")):
            if first_only and name != "D_gap":
                continue
            if math.isfinite(float(row[column])):
                out[f"{name}.{pair}"] = _short(row[column])
    return out
