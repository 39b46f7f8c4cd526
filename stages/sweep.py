"""DVC stage `sweep`: train the grid of params.yaml on Ray Tune -> results/sweep.csv and
results/checkpoints/<trial_id>.pt, tracked in MLflow.

    python -m stages.sweep [--params params.yaml] [--sweep-csv PATH] [--checkpoints PATH]

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

from pipeline.cli import EXIT_OK, entry_point, error
from pipeline.config import Params
from pipeline.stage_files import StageFiles, stage_file_names


def progress_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", type=int, default=1, choices=(0, 1, 2),
                        help="Ray Tune progress output (0 silent, 1 status table, 2 every result)")


@entry_point("python -m stages.sweep", __doc__, files=stage_file_names("sweep"),
             options=progress_option)
def main(params: Params, files: StageFiles, args: argparse.Namespace) -> int:
    from pipeline.results.tracking import sweep_hint
    from pipeline.sweep.run import SweepError, run_sweep     # Ray loads only after params are valid
    try:
        table = run_sweep(params, Path.cwd(), files=files, verbose=args.verbose)
    except SweepError as err:
        return error(str(err))
    counts = table["status"].value_counts().to_dict()
    print(f"{len(table)} trials ({', '.join(f'{n} {s}' for s, n in sorted(counts.items()))}) "
          f"-> {files.sweep_csv}")
    print(sweep_hint(params, table))        # the link to the sweep's runs in MLflow's UI
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
