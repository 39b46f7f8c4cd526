"""DVC stage `evaluate`: every completed sweep trial's checkpoint on the test set ->
results/evaluation.csv, results/comparison.csv (curve against curve, pipeline.comparison) and
metrics.json (best test -ELBO per method at beta = 1, mean over seeds; the curve gaps).

    python -m stages.evaluate [--params params.yaml]

Columns: the trial's sweep settings and status, test rate / distortion / -ELBO (nats), the
IWAE bound with k = evaluate.iwae_k where the method's marginal is a density (else empty, with
the reason in `note`), and Echo's low-rate limit. Exit status 0 on success, 1 for missing or bad
inputs, 2 for bad params. Then the final test metrics go to each trial's MLflow child run and
the three files to the sweep's parent run (pipeline.results_tracking; a tracking store it
cannot reach is one warning line, still exit 0).
"""
from __future__ import annotations

import argparse
import sys

from echo.data import DataError, load_prepared
from echo.train import device_problem
from pipeline.comparison import comparison_table
from pipeline.config import PARAMS_FILE, ParamsError, load_params
from pipeline.evaluation import (EvaluationError, evaluate_sweep, metrics_summary, read_sweep,
                                 write_csv, write_json)
from pipeline.results_tracking import publish
from pipeline.trials import TrialStatus

SWEEP_CSV = "results/sweep.csv"
EVALUATION_CSV = "results/evaluation.csv"
COMPARISON_CSV = "results/comparison.csv"
METRICS_JSON = "metrics.json"


def checkpoint_hint(message: str) -> str:
    """A damaged checkpoint of results/checkpoints is a DVC output of the sweep: deleting it
    retrains nothing (the sweep's experiment still holds the trial as finished). Say what
    restores it instead of the library's generic hint."""
    generic = "; delete it to retrain from scratch"
    if message.startswith("checkpoint ") and "cannot be loaded" in message:
        message = message.replace(generic, "")
        message += ("; restore it with `dvc checkout results/checkpoints` (or `dvc pull`), or "
                    "rewrite the sweep's outputs with `dvc repro -f sweep`")
    return message


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.evaluate",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--params", default=PARAMS_FILE, help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
    except ParamsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    settings = params.evaluate
    problem = device_problem(params.train.device)
    if problem:     # the models are evaluated here, on train.device
        print(f"error: train.device={params.train.device!r}: {problem}; set train.device: auto "
              f"or cpu", file=sys.stderr)
        return 1
    try:
        sweep = read_sweep(SWEEP_CSV)
        x_test = load_prepared(params.data.prepared_path, "test")[0][: settings.test_limit]
        table = evaluate_sweep(sweep, x_test, batch_size=settings.batch_size,
                               iwae_k=settings.iwae_k, device=params.train.device,
                               seed=settings.seed)
    except (EvaluationError, DataError) as err:
        print(f"error: {checkpoint_hint(str(err))}", file=sys.stderr)
        return 1
    comparison = comparison_table(table, seed=settings.seed)
    summary = metrics_summary(table, comparison)
    write_csv(table, EVALUATION_CSV)
    write_csv(comparison, COMPARISON_CSV)
    write_json(summary, METRICS_JSON)
    done = int((table["status"] == TrialStatus.COMPLETED).sum())
    print(f"evaluated {done} of {len(table)} trials on {len(x_test)} test images -> "
          f"{EVALUATION_CSV}, {COMPARISON_CSV}, {METRICS_JSON}")
    for method, entry in summary["best_test_neg_elbo"].items():
        spread = f" ± {entry['neg_elbo_sem']:.2f} (sem, {entry['n_seeds']} seeds)" \
            if "neg_elbo_sem" in entry else ""
        print(f"  {method}: best test -ELBO at beta={summary['beta']:g}: "
              f"{entry['neg_elbo']:.2f}{spread}")
    # The view in MLflow, after the files: a store it cannot reach is a warning, not a failure.
    publish("evaluate", params)
    return 0


if __name__ == "__main__":
    sys.exit(main())
