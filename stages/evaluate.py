"""DVC stage `evaluate`: every completed sweep trial's checkpoint on the test set ->
results/evaluation.csv, results/comparison.csv (curve against curve, pipeline.results.comparison) and
metrics.json (flat: best test -ELBO per method at beta = 1, mean over seeds; each pair's curve
gaps).

    python -m stages.evaluate [--params params.yaml] [--sweep-csv PATH] [--evaluation-csv PATH]
                              [--comparison-csv PATH] [--metrics-json PATH]

Columns: the trial's sweep settings and status, test rate / distortion / -ELBO (nats), the
IWAE bound with k = evaluate.iwae_k where the method's marginal is a density (else empty, with
the reason in `note`), and Echo's low-rate limit. Exit status 0 on success, 1 for missing or bad
inputs, 2 for bad params. Then the final test metrics go to each trial's MLflow child run and
the three files to the sweep's parent run (pipeline.results.tracking; a tracking store it
cannot reach is one warning line, still exit 0).
"""
from __future__ import annotations

import argparse
import sys

from echo.data import DataError, load_prepared
from echo.train import device_problem
from pipeline.results.aggregate import best_at_beta
from pipeline.cli import EXIT_OK, entry_point, error
from pipeline.results.comparison import comparison_table
from pipeline.config import Params
from pipeline.results.evaluation import (TABLE_BETA, EvaluationError, evaluate_sweep,
                                         metrics_summary, read_sweep, write_csv, write_json)
from pipeline.results.tracking import publish
from pipeline.stage_files import StageFiles, stage_file_names
from pipeline.records import TrialStatus


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


@entry_point("python -m stages.evaluate", __doc__, files=stage_file_names("evaluate"))
def main(params: Params, files: StageFiles, args: argparse.Namespace) -> int:
    settings = params.evaluate
    problem = device_problem(params.train.device)
    if problem:     # the models are evaluated here, on train.device
        return error(f"train.device={params.train.device!r}: {problem}; set train.device: auto "
                     f"or cpu")
    try:
        sweep = read_sweep(files.sweep_csv)
        x_test = load_prepared(params.data.prepared_path, "test")[0][: settings.test_limit]
        table = evaluate_sweep(sweep, x_test, batch_size=settings.batch_size,
                               iwae_k=settings.iwae_k, device=params.train.device,
                               seed=settings.seed)
    except (EvaluationError, DataError) as err:
        return error(checkpoint_hint(str(err)))
    comparison = comparison_table(table, seed=settings.seed)
    summary = metrics_summary(table, comparison)
    write_csv(table, files.evaluation_csv)
    write_csv(comparison, files.comparison_csv)
    write_json(summary, files.metrics_json)
    done = int((table["status"] == TrialStatus.COMPLETED).sum())
    print(f"evaluated {done} of {len(table)} trials on {len(x_test)} test images -> "
          f"{files.evaluation_csv}, {files.comparison_csv}, {files.metrics_json}")
    for method, row in best_at_beta(table, TABLE_BETA).iterrows():
        spread = f" ± {row['neg_elbo_sem']:.2f} (sem, {int(row['n_seeds'])} seeds)" \
            if int(row["n_seeds"]) > 1 else ""
        print(f"  {method}: best test -ELBO at beta={TABLE_BETA:g}: {row['neg_elbo']:.2f}{spread}")
    # The view in MLflow, after the files: a store it cannot reach is a warning, not a failure.
    publish("evaluate", params, files=files)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
