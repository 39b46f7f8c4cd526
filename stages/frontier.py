"""DVC stage `frontier`: results/evaluation.csv -> per-method R-D frontiers and figures.

    python -m stages.frontier [--params params.yaml] [--sweep-csv PATH] [--evaluation-csv PATH]
        [--comparison-csv PATH] [--frontier-csv PATH] [--rd-curves-png PATH]
        [--reconstructions-png PATH] [--table-md PATH]

Writes results/frontier.csv (Pareto-optimal seed-mean points per method with their standard
errors, flagged on the lower convex hull), results/rd_curves.png, results/reconstructions.png
and results/table.md (with the curve comparisons of results/comparison.csv, also printed), and
names the trials it left out (nonfinite / failed) on stderr and in table.md. Exit status 0 on
success, 1 for missing or bad inputs, 2 for bad params. Then the four files go to the sweep's
MLflow parent run (pipeline.results.tracking; a tracking store it cannot reach is one warning
line, still exit 0).
"""
from __future__ import annotations

import argparse
import sys

import pandas as pd

from echo.data import DataError, load_prepared
from pipeline.cli import EXIT_OK, entry_point, error
from pipeline.results.comparison import comparison_lines
from pipeline.config import Params
from pipeline.results.evaluation import EvaluationError, write_csv
from pipeline.results.frontier import excluded, exclusion_reason, frontier_table
from pipeline.results.known_answer import true_curve
from pipeline.results.plots import rd_curves, reconstructions
from pipeline.results.report import report, write_report
from pipeline.results.tracking import publish
from pipeline.stage_files import StageFiles, stage_file_names


@entry_point("python -m stages.frontier", __doc__, files=stage_file_names("frontier"))
def main(params: Params, files: StageFiles, args: argparse.Namespace) -> int:
    try:
        evaluation = pd.read_csv(files.evaluation_csv)
        comparison = pd.read_csv(files.comparison_csv)
    except FileNotFoundError as err:
        return error(f"{err.filename}: not found; run `dvc repro evaluate` first")
    for _, row in excluded(evaluation).iterrows():
        print(f"excluded {row['trial_id']} ({row['status']}): {exclusion_reason(row)}",
              file=sys.stderr)
    frontier = frontier_table(evaluation)
    write_csv(frontier, files.frontier_csv)
    dataset = params.data.dataset
    rd_curves(evaluation, frontier, files.rd_curves_png,
              title=f"{dataset}: rate-distortion on the test set; dotted: R + D = const",
              truth=true_curve(params))
    try:
        x_test = load_prepared(params.data.prepared_path, "test")[0]
        reconstructions(frontier, x_test, files.reconstructions_png,
                        samples=params.frontier.recon_samples, device="cpu")
    except (DataError, EvaluationError, ValueError) as err:
        return error(str(err))
    write_report(report(evaluation, frontier, comparison, dataset), files.table_md)
    print(f"{len(frontier)} frontier points of {frontier['series'].nunique()} methods "
          f"({len(excluded(evaluation))} trials excluded) -> {files.frontier_csv}, "
          f"{files.rd_curves_png}, {files.reconstructions_png}, {files.table_md}")
    for line in comparison_lines(comparison):
        print(line.replace("**", ""))
    # The view in MLflow, after the files: a store it cannot reach is a warning, not a failure.
    publish("frontier", params, files=files)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
