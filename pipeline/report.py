"""results/table.md: a Table-2-style summary at beta = 1, beside the paper's numbers.

At beta = 1 the objective D + R is the negative ELBO, a bound on -log p(x) (Sec. 3). For the
baselines the rate is the upper bound E[log q(z|x) - log p(z)]; for Echo it is exact (Eq. 4).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from echo.train import atomic_write
from pipeline.evaluation import TABLE_BETA, best_at_beta
from pipeline.frontier import excluded, exclusion_reason
from pipeline.paper import PAPER_TABLE_2

def _num(value, digits: int = 1) -> str:
    value = float(value)
    return f"{value:.{digits}f}" if math.isfinite(value) else "—"


def table_2(evaluation: pd.DataFrame, dataset: str, methods: list[str]) -> str:
    """Markdown table: ours (R, D, -ELBO, -IWAE_k) per method at beta = 1, the paper's beside."""
    best = best_at_beta(evaluation, TABLE_BETA)
    paper = PAPER_TABLE_2.get(dataset)
    head = ["method", "R", "D", "−ELBO", "−IWAE (k)", "trial"]
    if paper:
        head += ["paper R", "paper D", "paper −ELBO"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in methods:
        if method in best.index:
            row = best.loc[method]
            iwae = "—" if not math.isfinite(float(row["iwae_neg_log_lik"])) else \
                f"{float(row['iwae_neg_log_lik']):.1f} ({int(row['iwae_k'])})"
            cells = [method, _num(row["rate"]), _num(row["distortion"]), _num(row["neg_elbo"]),
                     iwae, str(row["trial_id"])]
        else:
            cells = [method, "—", "—", "—", "—", f"no completed trial at β={TABLE_BETA:g}"]
        if paper:
            cells += [_num(v) for v in paper.get(method, (math.nan,) * 3)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def hull_gap(front: pd.DataFrame, reference: pd.DataFrame, points: int = 200):
    """Mean distortion of `front`'s lower convex hull minus `reference`'s, over the rate range
    both hulls cover (linear interpolation between hull points): (gap in nats, low, high), or
    None when the ranges do not overlap. Negative: `front` reconstructs better at equal rate."""
    hulls = []
    for table in (front, reference):
        hull = table[table["on_hull"].astype(bool)].sort_values("rate")
        hulls.append((hull["rate"].to_numpy(float), hull["distortion"].to_numpy(float)))
    if not all(len(rate) for rate, _ in hulls):
        return None
    low = max(rate.min() for rate, _ in hulls)
    high = min(rate.max() for rate, _ in hulls)
    if not high > low:
        return None
    grid = np.linspace(low, high, points)
    a, b = (np.interp(grid, rate, distortion) for rate, distortion in hulls)
    return float(np.mean(a - b)), float(low), float(high)


def in_words(evaluation: pd.DataFrame, frontier: pd.DataFrame) -> list[str]:
    """Which method is ahead at beta = 1 and across the curve, with the numbers."""
    lines = []
    best = best_at_beta(evaluation, TABLE_BETA)
    if len(best):
        ranked = best.sort_values("neg_elbo")
        order = ", then ".join(f"{m} ({float(r['neg_elbo']):.2f})" for m, r in ranked.iterrows())
        lines.append(f"- At β = {TABLE_BETA:g} the lowest test −ELBO is {ranked.index[0]}'s: "
                     f"{order} nats.")
    series = list(dict.fromkeys(frontier["series"]))
    exact = set(evaluation.loc[np.isfinite(evaluation["low_rate_limit"].astype(float)), "method"])
    echo = [s for s in series if set(frontier.loc[frontier["series"] == s, "method"]) <= exact]
    for ours in echo:
        for other in (s for s in series if s not in echo):
            gap = hull_gap(frontier[frontier["series"] == ours],
                           frontier[frontier["series"] == other])
            if gap is None:
                lines.append(f"- {ours} and {other}: their curves cover no common rate range.")
                continue
            mean, low, high = gap
            side = "below" if mean < 0 else "above"
            lines.append(f"- Across the curve, over the rates both reach (R in [{low:.1f}, "
                         f"{high:.1f}] nats), {ours}'s distortion is on average "
                         f"{abs(mean):.2f} nats {side} {other}'s (lower convex hulls).")
    return lines


def report(evaluation: pd.DataFrame, frontier: pd.DataFrame, dataset: str) -> str:
    methods = list(dict.fromkeys(evaluation["method"].astype(str)))
    parts = [f"# Results on {dataset} (test set, nats)", "", "## In words", "",
             *in_words(evaluation, frontier), "",
             f"## Best −ELBO per method at β = {TABLE_BETA:g} (Table 2 style)", "",
             table_2(evaluation, dataset, methods), "",
             "R is exact for Echo (Eq. 4) and an upper bound (single-sample "
             "log q(z|x) − log p(z), or the analytic KL) for the other methods; −ELBO = R + D. "
             "−IWAE is the importance-weighted bound with k samples, for methods whose marginal "
             "is a density (not Echo)."]
    if dataset in PAPER_TABLE_2:
        parts.append("Paper: Brekelmans et al. 2019, Table 2 (conv architecture, 32 latents, "
                     "200 epochs).")
    else:
        parts.append(f"The paper reports no numbers for {dataset}; its data sets are "
                     f"{', '.join(PAPER_TABLE_2)}.")
    parts += ["", "## Rate-distortion frontier", "",
              "| series | frontier points | on the convex hull | rate range | best −ELBO |",
              "|---|---|---|---|---|"]
    for series, front in frontier.groupby("series", sort=False):
        parts.append(f"| {series} | {len(front)} | {int(front['on_hull'].astype(bool).sum())} | "
                     f"{_num(front['rate'].min())}–{_num(front['rate'].max())} | "
                     f"{_num(front['neg_elbo'].min())} |")
    left_out = excluded(evaluation)
    parts += ["", "## Excluded trials", ""]
    if left_out.empty:
        parts.append("None: every trial completed with finite test metrics.")
    else:
        for _, row in left_out.iterrows():
            parts.append(f"- `{row['trial_id']}` ({row['status']}): {exclusion_reason(row)}")
    return "\n".join(parts) + "\n"


def write_report(text: str, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: p.write_text(text))
