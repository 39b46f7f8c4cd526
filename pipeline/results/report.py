"""results/table.md: what the sweep shows, in words and tables, beside the paper's numbers.

- "In words": the β = 1 ranking and the curve-against-curve gaps (pipeline.results.comparison).
- A Table-2-style table at β = 1 (D + R is then the negative ELBO, a bound on -log p(x), Sec. 3):
  mean ± standard error over seeds, the seed count and the kind of each rate.
- The frontier per series, and the trials left out with their reasons.
"""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from echo.files import atomic_write
from pipeline.results.aggregate import best_at_beta
from pipeline.results.comparison import comparison_lines
from pipeline.results.evaluation import TABLE_BETA
from pipeline.results.frontier import excluded, exclusion_reason
from pipeline.results.paper import PAPER_TABLE_2
from pipeline.results.tracking import IN_WORDS       # the section MLflow's description quotes

RATE_KIND_LABELS = {"exact": "exact", "analytic_kl": "bound (analytic KL)",
                    "single_sample_bound": "bound (1 sample)"}


def _num(value, digits: int = 1) -> str:
    value = float(value)
    return f"{value:.{digits}f}" if math.isfinite(value) else "—"


def _mean_sem(row: pd.Series, name: str, digits: int = 1) -> str:
    """"12.3 ± 0.4" (standard error over seeds), or just the mean for one seed."""
    sem = float(row[f"{name}_sem"])
    return _num(row[name], digits) + (f" ± {sem:.{digits}f}" if math.isfinite(sem) else "")


def rate_kind_label(kind: str) -> str:
    return RATE_KIND_LABELS.get(str(kind), str(kind))


def table_2(evaluation: pd.DataFrame, dataset: str, methods: list[str]) -> str:
    """Markdown table: ours (R, D, -ELBO, -IWAE_k; mean ± sem over seeds) per method at beta = 1,
    the paper's beside."""
    best = best_at_beta(evaluation, TABLE_BETA)
    paper = PAPER_TABLE_2.get(dataset)
    head = ["method", "R", "rate kind", "D", "−ELBO", "−IWAE (k)", "seeds", "trial"]
    if paper:
        head += ["paper R", "paper D", "paper −ELBO"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in methods:
        if method in best.index:
            row = best.loc[method]
            iwae = "—" if not math.isfinite(float(row["iwae_neg_log_lik"])) else \
                f"{_mean_sem(row, 'iwae_neg_log_lik')} ({int(row['iwae_k'])})"
            cells = [method, _mean_sem(row, "rate"), rate_kind_label(row["rate_kind"]),
                     _mean_sem(row, "distortion"), _mean_sem(row, "neg_elbo"), iwae,
                     str(int(row["n_seeds"])), str(row["trial_id"])]
        else:
            cells = [method, "—", "—", "—", "—", "—", "0", f"no completed trial at β={TABLE_BETA:g}"]
        if paper:
            cells += [_num(v) for v in paper.get(method, (math.nan,) * 3)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def in_words(evaluation: pd.DataFrame, comparison: pd.DataFrame) -> list[str]:
    """Which method is ahead at beta = 1 and across the curve, with the numbers."""
    lines = []
    best = best_at_beta(evaluation, TABLE_BETA)
    if len(best):
        ranked = best.sort_values("neg_elbo")
        order = ", then ".join(f"{m} ({_mean_sem(r, 'neg_elbo', 2)})" for m, r in ranked.iterrows())
        seeds = sorted(set(int(n) for n in ranked["n_seeds"]))
        lines.append(f"- At β = {TABLE_BETA:g} the lowest test −ELBO is {ranked.index[0]}'s: "
                     f"{order} nats (mean ± standard error over "
                     f"{'/'.join(map(str, seeds))} seed(s)).")
        lines += floor_lines(best)
    lines += comparison_lines(comparison)
    return lines


def floor_lines(best: pd.DataFrame) -> list[str]:
    """What Echo's low-rate limit (-d log r, eq. 4 with S at its clip r) costs at beta = 1:
    whether another method's rate there lies below the limit, i.e. where Echo cannot go."""
    lines = []
    limits = best["low_rate_limit"].astype(float)
    for method, row in best[limits.notna()].iterrows():
        limit, rate = float(row["low_rate_limit"]), float(row["rate"])
        below = {m: float(r["rate"]) for m, r in best.iterrows()
                 if m != method and float(r["rate"]) < limit}
        where = (f"{method}'s rate at β = {TABLE_BETA:g} is {rate:.2f} nats; its low-rate limit "
                 f"at {int(row['latent_dim'])} latents is {limit:.2f} (−d log r: no encoder "
                 f"spends less)")
        if below:
            others = ", ".join(f"{m} {r:.2f}" for m, r in below.items())
            lines.append(f"- {where}. The limit binds: {others} nats lie below it, where "
                         f"{method} cannot go at this latent size, so part of {method}'s "
                         f"−ELBO gap to {', '.join(below)} here may be the limit's cost, not "
                         f"the channel's (fewer latents lower it, docs/methods.md).")
        else:
            lines.append(f"- {where}. The limit does not bind: every other method's rate "
                         f"there is above it.")
    return lines


def report(evaluation: pd.DataFrame, frontier: pd.DataFrame, comparison: pd.DataFrame,
           dataset: str) -> str:
    methods = list(dict.fromkeys(evaluation["method"].astype(str)))
    parts = [f"# Results on {dataset} (test set, nats)", "", IN_WORDS, "",
             *in_words(evaluation, comparison), "",
             "How to read a curve comparison: `a vs b: +x nats of distortion at equal rate over R "
             "in [lo, hi]` is the mean vertical distance of a's lower convex hull above b's over "
             "the rates both reach (negative: a reconstructs better at equal rate); the rate gap "
             "is the horizontal distance at equal distortion (negative: a needs fewer nats). "
             "Intervals are 95% bootstrap intervals over seeds (results/comparison.csv).", "",
             f"## Best −ELBO per method at β = {TABLE_BETA:g} (Table 2 style)", "",
             table_2(evaluation, dataset, methods), "",
             "Mean ± standard error over seeds. The rate kind says how R was obtained: exact for "
             "Echo (Eq. 4); for the other methods an upper bound on I(X;Z), E KL(q(z|x) ‖ p(z)), "
             "in closed form (analytic KL) or from one sample of log q(z|x) − log p(z). "
             "−ELBO = R + D. −IWAE is the importance-weighted bound with k samples, for methods "
             "whose marginal is a density (not Echo)."]
    if dataset in PAPER_TABLE_2:
        parts.append("Paper: Brekelmans et al. 2019, Table 2 (conv architecture, 32 latents, "
                     "200 epochs).")
    else:
        parts.append(f"The paper reports no numbers for {dataset}; its data sets are "
                     f"{', '.join(PAPER_TABLE_2)}.")
    parts += ["", "## Rate-distortion frontier", "",
              "| series | rate kind | frontier points | on the convex hull | rate range | "
              "best −ELBO | seeds |", "|---|---|---|---|---|---|---|"]
    for series, front in frontier.groupby("series", sort=False):
        best = front.loc[front["neg_elbo"].astype(float).idxmin()]
        seeds = "/".join(str(n) for n in sorted(set(int(n) for n in front["n_seeds"])))
        parts.append(f"| {series} | {rate_kind_label(front['rate_kind'].iloc[0])} | {len(front)} | "
                     f"{int(front['on_hull'].astype(bool).sum())} | "
                     f"{_num(front['rate'].min())}–{_num(front['rate'].max())} | "
                     f"{_mean_sem(best, 'neg_elbo')} | {seeds} |")
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
