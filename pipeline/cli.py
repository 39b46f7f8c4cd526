"""The one command line of the pipeline's entry points (`python -m stages.<name>`, `python -m
pipeline.results.tracking`): `--params`, an option per file the command reads or writes
(pipeline.stage_files), the params validated before anything else, and the exit statuses.

    @entry_point("python -m stages.evaluate", __doc__, files=stage_file_names("evaluate"))
    def main(params: Params, files: StageFiles, args: argparse.Namespace) -> int:
        ...                     # return EXIT_OK, or error("one line naming the fix")

Exit statuses: 0 done, 1 the inputs or the run failed (one `error:` line on stderr), 2 bad
params (one line naming the field; nothing was read or written).
"""
from __future__ import annotations

import argparse
import functools
import sys
from dataclasses import replace
from typing import Callable, Sequence

from pipeline.config import PARAMS_FILE, Params, ParamsError, load_params
from pipeline.stage_files import DEFAULT_FILES, StageFiles, describe, option

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_PARAMS = 2

Run = Callable[[Params, StageFiles, argparse.Namespace], int]


def error(message: str, status: int = EXIT_FAILED) -> int:
    """Print `error: <message>` on stderr; returns the exit status to return."""
    print(f"error: {message}", file=sys.stderr)
    return status


def parser_for(prog: str, doc: str, files: Sequence[str] = (),
               options: Callable[[argparse.ArgumentParser], None] | None = None
               ) -> argparse.ArgumentParser:
    """--params, one option per file in `files` (defaults from pipeline.stage_files), and the
    command's own `options`; the description is the first line of `doc`."""
    parser = argparse.ArgumentParser(prog=prog, description=(doc or "").strip().split("\n")[0])
    parser.add_argument("--params", default=PARAMS_FILE,
                        help=f"params file (default: {PARAMS_FILE})")
    for name in files:
        default = getattr(DEFAULT_FILES, name)
        parser.add_argument(option(name), dest=name, type=type(default), default=default,
                            metavar="PATH", help=f"{describe(name)} (default: {default})")
    if options is not None:
        options(parser)
    return parser


def entry_point(prog: str, doc: str, *, files: Sequence[str] = (),
                options: Callable[[argparse.ArgumentParser], None] | None = None
                ) -> Callable[[Run], Callable[[list[str] | None], int]]:
    """Turn `run(params, files, args) -> exit status` into `main(argv=None) -> exit status`:
    parse the command line, load and validate the params file (a bad one: one line, exit 2,
    before `run` reads or writes anything), and hand `run` the files the command was given."""
    def wrap(run: Run) -> Callable[[list[str] | None], int]:
        @functools.wraps(run)
        def main(argv: list[str] | None = None) -> int:
            args = parser_for(prog, doc, files, options).parse_args(argv)
            try:
                params = load_params(args.params)
            except ParamsError as err:
                return error(str(err), EXIT_BAD_PARAMS)
            given = replace(DEFAULT_FILES, **{name: getattr(args, name) for name in files})
            return run(params, given, args)
        return main
    return wrap
