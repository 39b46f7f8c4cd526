"""Curve against curve: how far each method's R-D curve lies from every other's, in nats.

For each pair of series (exact-rate ones such as Echo first, so that Echo is always compared
with every baseline), `echo.frontier.bootstrap_curve_gap` on the seed-mean curves: the mean
distortion gap between their lower convex hulls over the rate range both cover (the analogue of
the Bjontegaard delta of image codecs), the mean rate gap at equal distortion, the ranges, and
95% bootstrap intervals over seeds. Negative gaps: the first series is better.

A baseline's rate is an upper bound on its I(X;Z) (analytic KL or a single-sample estimate of
it); Echo's is exact (Eq. 4). At its true rate a baseline's points would lie further left, so
against a bound an exact-rate curve's lead can be overstated and its deficit is conservative:
each row's `note` says so where the kinds differ.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from echo.frontier import bootstrap_curve_gap
from pipeline.results.aggregate import seed_trials

GAP_COLUMNS = ["distortion_gap", "distortion_gap_low", "distortion_gap_high", "rate_low",
               "rate_high", "rate_gap", "rate_gap_low", "rate_gap_high", "distortion_low",
               "distortion_high"]
COMPARISON_COLUMNS = ["series_a", "series_b", "rate_kind_a", "rate_kind_b", "seeds_a", "seeds_b",
                      *GAP_COLUMNS, "level", "note"]
LEVEL = 0.95
RESAMPLES = 2000
RATE_KIND_WORDS = {"exact": "exact", "analytic_kl": "an upper bound (analytic KL)",
                   "single_sample_bound": "an upper bound (single-sample estimate)"}


def seed_curves(trials: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """A series' runs as [seeds, betas] arrays of test rate and distortion (NaN where a seed's
    trial at that beta did not complete)."""
    rate = trials.pivot_table(index="seed", columns="beta", values="rate", aggfunc="first")
    distortion = trials.pivot_table(index="seed", columns="beta", values="distortion",
                                    aggfunc="first").reindex_like(rate)
    return rate.to_numpy(float), distortion.to_numpy(float)


def provenance_note(series_a: str, kind_a: str, series_b: str, kind_b: str) -> str:
    """What comparing these two kinds of rate means (empty when they are the same kind)."""
    bound_a, bound_b = kind_a != "exact", kind_b != "exact"
    if bound_a == bound_b:
        return "" if kind_a == kind_b else f"both rates are upper bounds ({kind_a}, {kind_b})"
    exact, bound, kind = (series_a, series_b, kind_b) if bound_b else (series_b, series_a, kind_a)
    return (f"{exact}'s rate is exact, {bound}'s {RATE_KIND_WORDS.get(kind, kind)}: at its true "
            f"I(X;Z) {bound}'s curve lies further left, so a lead of {exact}'s may be "
            f"overstated and a deficit is conservative")


def series_order(trials: pd.DataFrame) -> list[str]:
    """Exact-rate series first, then the others, each in sweep order."""
    series = list(dict.fromkeys(trials["series"]))
    exact = set(trials.loc[trials["rate_kind"] == "exact", "series"])
    return [s for s in series if s in exact] + [s for s in series if s not in exact]


def comparison_table(evaluation: pd.DataFrame, *, resamples: int = RESAMPLES,
                     level: float = LEVEL, seed: int = 0) -> pd.DataFrame:
    """One row per pair of series whose curves share a rate or distortion range."""
    trials = seed_trials(evaluation)
    rows = []
    if trials.empty:
        return pd.DataFrame(columns=COMPARISON_COLUMNS)
    order = series_order(trials)
    for i, a in enumerate(order):
        for b in order[i + 1:]:
            ta, tb = trials[trials["series"] == a], trials[trials["series"] == b]
            gap = bootstrap_curve_gap(*seed_curves(ta), *seed_curves(tb), resamples=resamples,
                                      level=level, seed=seed)
            if not gap:
                continue
            kind_a, kind_b = ta["rate_kind"].iloc[0], tb["rate_kind"].iloc[0]
            rows.append({"series_a": a, "series_b": b, "rate_kind_a": kind_a,
                         "rate_kind_b": kind_b, **gap, "level": level,
                         "note": provenance_note(a, kind_a, b, kind_b)})
    return pd.DataFrame(rows, columns=COMPARISON_COLUMNS)


def _interval(row: pd.Series, name: str) -> str:
    low, high = float(row[f"{name}_low"]), float(row[f"{name}_high"])
    if not (math.isfinite(low) and math.isfinite(high)):
        return "no interval: one seed each"
    return (f"{100 * float(row['level']):g}% bootstrap interval [{low:+.2f}, {high:+.2f}] over "
            f"{int(row['seeds_a'])} and {int(row['seeds_b'])} seeds")


def comparison_lines(table: pd.DataFrame) -> list[str]:
    """table.md's summary, one line per pair, e.g. "echo vs vae: +0.60 nats of distortion at
    equal rate over R in [8.5, 43.4] (...)"."""
    lines = []
    for _, row in table.iterrows():
        a, b = row["series_a"], row["series_b"]
        parts = []
        if math.isfinite(float(row["distortion_gap"])):
            parts.append(f"{float(row['distortion_gap']):+.2f} nats of distortion at equal rate "
                         f"over R in [{float(row['rate_low']):.1f}, {float(row['rate_high']):.1f}]"
                         f" ({_interval(row, 'distortion_gap')})")
        if math.isfinite(float(row["rate_gap"])):
            parts.append(f"{float(row['rate_gap']):+.2f} nats of rate at equal distortion over "
                         f"D in [{float(row['distortion_low']):.1f}, "
                         f"{float(row['distortion_high']):.1f}] ({_interval(row, 'rate_gap')})")
        note = row["note"] if isinstance(row["note"], str) else ""   # "" reads back as NaN
        note = f". {note[0].upper()}{note[1:]}" if note else ""
        lines.append(f"- **{a} vs {b}**: " + "; ".join(parts) + note + ".")
    return lines


def comparison_metrics(table: pd.DataFrame) -> dict:
    """metrics.json's `comparison`: per pair (`<a>_vs_<b>`), the finite gaps and ranges."""
    out = {}
    for _, row in table.iterrows():
        key = f"{row['series_a']}_vs_{row['series_b']}".replace(" ", "_")
        out[key] = {name: float(row[name]) for name in GAP_COLUMNS
                    if math.isfinite(float(row[name]))}
    return out
