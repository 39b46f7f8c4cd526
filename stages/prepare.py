"""DVC stage `prepare`: raw files -> <data.prepared_dir>/<data.dataset>.npz + .manifest.json.

    python -m stages.prepare [--params params.yaml]

Reads the `data` section of params.yaml; downloads missing raw files when `data.download` is
true. Exit status 0 on success, 1 for bad or missing data, 2 for bad params; errors are one
line on stderr and leave no partial output (see `echo.data.prepare`).
"""
from __future__ import annotations

import argparse
import logging
import sys

from echo.data import DataError, manifest_path, prepare
from pipeline.cli import EXIT_OK, entry_point, error
from pipeline.config import Params
from pipeline.data_errors import data_error_line
from pipeline.stage_files import StageFiles

# Its outputs are named by the params' `data` section (dvc.yaml's outs), not by options.
@entry_point("python -m stages.prepare", __doc__)
def main(params: Params, files: StageFiles, args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    data = params.data
    try:
        manifest = prepare(data.dataset, data.raw_dir, data.prepared_dir, download=data.download,
                           seed=data.binarization_seed, check_sizes=data.check_sizes)
    except DataError as err:
        return error(data_error_line(err))
    sizes = ", ".join(f"{split} {info['n']:,}" for split, info in manifest["splits"].items())
    print(f"prepared {manifest['variant']} ({sizes}) -> {data.prepared_path} "
          f"and {manifest_path(data.prepared_path).name}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
