"""The files the stages pass to each other: one name each, its default place, and which stage
reads and which writes it.

dvc.yaml names every one in the `cmd` of each stage that uses it (`python -m stages.sweep
--sweep-csv results/sweep.csv --checkpoints results/checkpoints`) and lists it among that
stage's deps or outs. The defaults below, the only ones in the code, are what a stage run by
hand uses: the same places as dvc.yaml's, so that `python -m stages.evaluate` after `dvc repro
sweep` finds the sweep's table (tests/test_stage_cli.py checks all three).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path


def _file(default: str, what: str):
    return field(default=Path(default), metadata={"help": what})


@dataclass(frozen=True)
class StageFiles:
    """Where each file is; paths relative to the project root (the stage's working directory)."""
    sweep_csv: Path = _file("results/sweep.csv", "the sweep's table, one row per trial")
    checkpoints: Path = _file("results/checkpoints",
                              "folder of the completed trials' models, <trial_id>.pt")
    evaluation_csv: Path = _file("results/evaluation.csv", "every trial's test-set metrics")
    comparison_csv: Path = _file("results/comparison.csv", "the R-D curves compared")
    metrics_json: Path = _file("metrics.json", "DVC metrics: best test -ELBO per method")
    frontier_csv: Path = _file("results/frontier.csv", "the R-D frontier of every method")
    rd_curves_png: Path = _file("results/rd_curves.png", "the R-D figure")
    reconstructions_png: Path = _file("results/reconstructions.png",
                                      "reconstructions along the frontier")
    table_md: Path = _file("results/table.md", "the results as a Markdown report")


DEFAULT_FILES = StageFiles()

# What each stage reads and writes of them (prepare's outputs are named by the params' `data`).
READS = {"prepare": (), "sweep": (),
         "evaluate": ("sweep_csv",),
         "frontier": ("sweep_csv", "evaluation_csv", "comparison_csv")}
WRITES = {"prepare": (), "sweep": ("sweep_csv", "checkpoints"),
          "evaluate": ("evaluation_csv", "comparison_csv", "metrics_json"),
          "frontier": ("frontier_csv", "rd_curves_png", "reconstructions_png", "table_md")}


def stage_file_names(*stages: str) -> tuple[str, ...]:
    """The files the given stages read or write, each once, in StageFiles' order."""
    used = {name for stage in stages for name in (*READS[stage], *WRITES[stage])}
    return tuple(f.name for f in fields(StageFiles) if f.name in used)


def option(name: str) -> str:
    """The command-line option of a file, the same in every stage: sweep_csv -> --sweep-csv."""
    return "--" + name.replace("_", "-")


def describe(name: str) -> str:
    """What a file is (its option's help)."""
    return next(f.metadata["help"] for f in fields(StageFiles) if f.name == name)
