"""DVC stage `sweep`: train the grid of params.yaml on Ray Tune -> results/sweep.csv and
results/checkpoints/<trial_id>.pt, tracked in MLflow.

    python -m stages.sweep [--params params.yaml]

Runs on this machine, or on the Ray cluster at $RAY_ADDRESS. Running it again after an
interruption resumes the sweep (finished trials are kept). Exit status 0 when every trial has
ended (completed, nonfinite or failed: see the status column) and at least one completed; 1
when the sweep cannot start (bad device, unwritable outputs, another driver running it), was
interrupted (run again to resume) or no trial completed (no results/sweep.csv is written); 2
for bad params.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.config import PARAMS_FILE, ParamsError, load_params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.sweep",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--params", default=PARAMS_FILE, help="params file (default: params.yaml)")
    parser.add_argument("--verbose", type=int, default=1, choices=(0, 1, 2),
                        help="Ray Tune progress output (0 silent, 1 status table, 2 every result)")
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
    except ParamsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from pipeline.sweep import SweepError, run_sweep     # Ray loads only after params are valid
    try:
        table = run_sweep(params, Path.cwd(), verbose=args.verbose)
    except SweepError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    counts = table["status"].value_counts().to_dict()
    print(f"{len(table)} trials ({', '.join(f'{n} {s}' for s, n in sorted(counts.items()))}) "
          f"-> results/sweep.csv; MLflow: mlflow ui --backend-store-uri {params.tracking.uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
