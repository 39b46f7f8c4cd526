"""DVC stage `evaluate`: every completed sweep trial's checkpoint on the test set ->
results/evaluation.csv and metrics.json (best test -ELBO per method at beta = 1).

    python -m stages.evaluate [--params params.yaml]

Columns: the trial's sweep settings and status, test rate / distortion / -ELBO (nats), the
IWAE bound with k = evaluate.iwae_k where the method's marginal is a density (else empty, with
the reason in `note`), and Echo's low-rate limit. Exit status 0 on success, 1 for missing or bad
inputs, 2 for bad params.
"""
from __future__ import annotations

import argparse
import sys

from echo.data import DataError, load_prepared
from pipeline.config import PARAMS_FILE, ParamsError, load_params
from pipeline.evaluation import (EvaluationError, evaluate_sweep, metrics_summary, read_sweep,
                                 write_csv, write_json)

SWEEP_CSV = "results/sweep.csv"
EVALUATION_CSV = "results/evaluation.csv"
METRICS_JSON = "metrics.json"


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
    try:
        sweep = read_sweep(SWEEP_CSV)
        x_test = load_prepared(params.data.prepared_path, "test")[0][: settings.test_limit]
        table = evaluate_sweep(sweep, x_test, batch_size=settings.batch_size,
                               iwae_k=settings.iwae_k, device=params.train.device,
                               seed=settings.seed)
    except (EvaluationError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    summary = metrics_summary(table)
    write_csv(table, EVALUATION_CSV)
    write_json(summary, METRICS_JSON)
    done = int((table["status"] == "completed").sum())
    print(f"evaluated {done} of {len(table)} trials on {len(x_test)} test images -> "
          f"{EVALUATION_CSV}, {METRICS_JSON}")
    for method, entry in summary["best_test_neg_elbo"].items():
        print(f"  {method}: best test -ELBO at beta={summary['beta']:g}: {entry['neg_elbo']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
