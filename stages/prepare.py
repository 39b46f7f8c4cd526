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
from pipeline.stage_files import StageFiles

# The params.yaml field behind each argument of echo.data's loaders, so that a DataError's fix
# ("set check_sizes=False") reads as the field to change ("set data.check_sizes: false").
DATA_FIELDS = {"root": "data.raw_dir", "download": "data.download",
               "check_sizes": "data.check_sizes"}


def yaml_setting(field: str, value: object) -> str:
    """`field: value` as params.yaml spells it (booleans lower case)."""
    shown = str(value).lower() if isinstance(value, bool) else value
    return f"{field}: {shown}"


def data_error_line(err: DataError) -> str:
    """A DataError's one line with the library arguments it names as params.yaml fields."""
    return err.rephrased(DATA_FIELDS, yaml_setting)


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
