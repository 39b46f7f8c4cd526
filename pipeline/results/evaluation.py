"""Evaluate every completed sweep trial's final checkpoint on the test set.

For each trial: test rate, distortion and -ELBO = R + D (nats, one encoder sample per example),
how the rate was obtained (`rate_kind`: exact, analytic_kl or single_sample_bound; see
`echo.Autoencoder.rate_kind`), and the importance-weighted bound -log p(x) >= -IWAE_k where the method's marginal is a density.
Echo's marginal q(z) = E_x q(z|x) has no closed form, so Echo gets no IWAE bound; its -ELBO is
already tight in the rate (Eq. 4, exact). Trials that did not complete (nonfinite, failed) are
kept as rows without metrics so later stages can say what was excluded and why.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from echo import echo_low_rate_limit
from echo.files import atomic_write
from echo.train import evaluate, iwae_neg_log_likelihood, load_model, resolve_device
from pipeline.results.aggregate import best_at_beta
from pipeline.results.headline import best_neg_elbo, pair_gaps
from pipeline.results.known_answer import KNOWN_ANSWER_COLUMNS, known_answer_columns
from pipeline.records import SETTING_COLUMNS, TrialStatus

# What evaluate reads of results/sweep.csv (pipeline.records.CSV_COLUMNS).
SWEEP_COLUMNS = (*SETTING_COLUMNS, "status", "error", "checkpoint")
# Of those, what evaluate cannot do without (the rest of a trial's provenance is carried over).
NEEDED_COLUMNS = ("trial_id", "method", "beta", "status", "error", "checkpoint")
METRIC_COLUMNS = ("rate", "rate_kind", "distortion", "neg_elbo", "iwae_k", "iwae_neg_log_lik",
                  "low_rate_limit", "note", *KNOWN_ANSWER_COLUMNS)
EVALUATION_COLUMNS = SWEEP_COLUMNS + METRIC_COLUMNS
NO_DENSITY_NOTE = ("no IWAE bound: the marginal q(z) has no closed-form density (exact-rate "
                   "method); -ELBO uses the exact rate")
TABLE_BETA = 1.0            # beta = 1: -ELBO is a bound on -log p(x) (Table 2)


class EvaluationError(ValueError):
    """The sweep table or a checkpoint it names cannot be used; the message says which."""


def read_sweep(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise EvaluationError(f"{path}: not found; run the sweep first (`dvc repro sweep`)")
    table = pd.read_csv(path, keep_default_na=True)
    missing = [c for c in NEEDED_COLUMNS if c not in table.columns]
    if missing:
        raise EvaluationError(f"{path}: missing column(s) {missing}; it must come from "
                              f"`python -m stages.sweep`")
    # A table written before a setting column existed (a newer training setting or method
    # option): that setting is unknown there, not wrong.
    for column in SWEEP_COLUMNS:
        if column not in table.columns:
            table[column] = np.nan
    return table


def evaluate_checkpoint(checkpoint: str | Path, x_test: torch.Tensor, *, batch_size: int,
                        iwae_k: int, device: torch.device, seed: int = 0) -> dict:
    """Test-set metrics of one trained model (see the module docstring for the columns)."""
    path = Path(checkpoint)
    if not path.exists():
        raise EvaluationError(f"checkpoint {path} listed in the sweep table is missing; re-run "
                              f"the sweep (`dvc repro -f sweep`)")
    try:
        model, config = load_model(path, device=str(device))
    except ValueError as err:
        raise EvaluationError(str(err)) from None
    torch.manual_seed(seed)          # the encoder noise: the same numbers on every re-run
    x = x_test.to(device)
    # Echo draws its noise from the rest of the batch: evaluate with at least the training
    # batch so the truncated sum keeps the precision its clipping factor was solved for.
    batch = max(batch_size, config.batch_size)
    metrics = evaluate(model, x, batch, beta=config.beta)
    row = {**metrics, "rate_kind": model.rate_kind, "iwae_k": np.nan, "iwae_neg_log_lik": np.nan, "low_rate_limit": np.nan,
           "note": ""}
    if model.has_density:
        row["iwae_k"] = iwae_k
        row["iwae_neg_log_lik"] = iwae_neg_log_likelihood(model, x, iwae_k, batch)
    else:
        row["note"] = NO_DENSITY_NOTE
    clip = getattr(model.channel, "clip_factor", None)
    if getattr(model.channel, "exact_rate", False) and clip is not None:
        row["low_rate_limit"] = echo_low_rate_limit(clip, config.latent_dim)
    # Where the data set's R-D function is known: the excess over it (pipeline.results.known_answer).
    row.update(known_answer_columns(model, config, x, batch, row))
    return row


def evaluate_sweep(sweep: pd.DataFrame, x_test: torch.Tensor, *, batch_size: int, iwae_k: int,
                   device: str = "auto", seed: int = 0, progress: bool = True) -> pd.DataFrame:
    """One row per sweep trial; metrics for the completed ones (tqdm bar over checkpoints)."""
    dev = resolve_device(device)
    rows = []
    completed = sweep["status"] == TrialStatus.COMPLETED
    # `with`: an error closes the bar first, so its message is not printed on the bar's line
    with tqdm(total=int(completed.sum()), desc="evaluate", unit="model",
              disable=not progress) as bar:
        for _, trial in sweep.iterrows():
            row = {c: trial.get(c, np.nan) for c in SWEEP_COLUMNS}   # read_sweep's or older
            row.update({c: np.nan for c in METRIC_COLUMNS})
            if trial["status"] == TrialStatus.COMPLETED:
                row.update(evaluate_checkpoint(trial["checkpoint"], x_test, batch_size=batch_size,
                                               iwae_k=iwae_k, device=dev, seed=seed))
                bar.set_postfix(method=trial["method"], beta=trial["beta"],
                                neg_elbo=f"{row['neg_elbo']:.2f}")
                bar.update(1)
            else:
                row["note"] = f"excluded: {trial['status']}"
            rows.append(row)
    return pd.DataFrame(rows, columns=list(EVALUATION_COLUMNS))


def metrics_summary(evaluation: pd.DataFrame, comparison: pd.DataFrame | None = None,
                    beta: float = TABLE_BETA) -> dict[str, float]:
    """metrics.json, flat and numeric (pipeline.results.headline): `neg_elbo.<method>`, the best test
    -ELBO at `beta` (mean over seeds), and `D_gap.<a>_vs_<b>` of the first series against each
    other, so that `dvc metrics show` / `dvc exp show` give one short column each."""
    out = best_neg_elbo(best_at_beta(evaluation, beta))
    if comparison is not None:
        out.update(pair_gaps(comparison, first_only=True))
    return out


def write_csv(table: pd.DataFrame, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: table.to_csv(p, index=False, float_format="%.6g"))


def write_json(data: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: p.write_text(json.dumps(data, indent=2) + "\n"))
