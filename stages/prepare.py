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
from pipeline.config import PARAMS_FILE, ParamsError, load_params

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.prepare", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default=PARAMS_FILE, help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        data = load_params(args.params).data
        manifest = prepare(data.dataset, data.raw_dir, data.prepared_dir, download=data.download,
                           seed=data.binarization_seed, check_sizes=data.check_sizes)
    except ParamsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except DataError as err:
        print(f"error: {data_error_line(err)}", file=sys.stderr)
        return 1
    sizes = ", ".join(f"{split} {info['n']:,}" for split, info in manifest["splits"].items())
    print(f"prepared {manifest['variant']} ({sizes}) -> {data.prepared_path} "
          f"and {manifest_path(data.prepared_path).name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
