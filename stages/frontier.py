"""DVC stage `frontier`: results/evaluation.csv -> per-method R-D frontiers and figures.

    python -m stages.frontier [--params params.yaml]

Writes results/frontier.csv (Pareto-optimal seed-mean points per method with their standard
errors, flagged on the lower convex hull), results/rd_curves.png, results/reconstructions.png
and results/table.md (with the curve comparisons of results/comparison.csv, also printed), and
names the trials it left out (nonfinite / failed) on stderr and in table.md. Exit status 0 on
success, 1 for missing or bad inputs, 2 for bad params. Then the four files go to the sweep's
MLflow parent run (pipeline.results_tracking; a tracking store it cannot reach is one warning
line, still exit 0).
"""
from __future__ import annotations

import argparse
import sys

import pandas as pd

from echo.data import DataError, load_prepared
from pipeline.comparison import comparison_lines
from pipeline.config import PARAMS_FILE, ParamsError, load_params
from pipeline.evaluation import EvaluationError, write_csv
from pipeline.frontier import excluded, exclusion_reason, frontier_table
from pipeline.plots import rd_curves, reconstructions
from pipeline.report import report, write_report
from pipeline.results_tracking import publish

EVALUATION_CSV = "results/evaluation.csv"
COMPARISON_CSV = "results/comparison.csv"
FRONTIER_CSV = "results/frontier.csv"
RD_CURVES_PNG = "results/rd_curves.png"
RECONSTRUCTIONS_PNG = "results/reconstructions.png"
TABLE_MD = "results/table.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.frontier",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--params", default=PARAMS_FILE, help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
    except ParamsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        evaluation = pd.read_csv(EVALUATION_CSV)
        comparison = pd.read_csv(COMPARISON_CSV)
    except FileNotFoundError as err:
        print(f"error: {err.filename}: not found; run `dvc repro evaluate` first",
              file=sys.stderr)
        return 1
    for _, row in excluded(evaluation).iterrows():
        print(f"excluded {row['trial_id']} ({row['status']}): {exclusion_reason(row)}",
              file=sys.stderr)
    frontier = frontier_table(evaluation)
    write_csv(frontier, FRONTIER_CSV)
    dataset = params.data.dataset
    rd_curves(evaluation, frontier, RD_CURVES_PNG,
              title=f"{dataset}: rate-distortion on the test set; dotted: R + D = const")
    try:
        x_test = load_prepared(params.data.prepared_path, "test")[0]
        reconstructions(frontier, x_test, RECONSTRUCTIONS_PNG,
                        samples=params.frontier.recon_samples, device="cpu")
    except (DataError, EvaluationError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    write_report(report(evaluation, frontier, comparison, dataset), TABLE_MD)
    print(f"{len(frontier)} frontier points of {frontier['series'].nunique()} methods "
          f"({len(excluded(evaluation))} trials excluded) -> {FRONTIER_CSV}, {RD_CURVES_PNG}, "
          f"{RECONSTRUCTIONS_PNG}, {TABLE_MD}")
    for line in comparison_lines(comparison):
        print(line.replace("**", ""))
    # The view in MLflow, after the files: a store it cannot reach is a warning, not a failure.
    publish("frontier", params)
    return 0


if __name__ == "__main__":
    sys.exit(main())
