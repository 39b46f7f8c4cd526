"""The stages' one command line (pipeline/cli.py): dvc.yaml's `cmd` of every stage names each
file the stage reads or writes (pipeline/stage_files.py), each of them is that stage's dep or
out, and a stage given other paths reads and writes those."""
from __future__ import annotations

import shlex

import pytest
import yaml

from pipeline.cli import EXIT_BAD_PARAMS, EXIT_FAILED, parser_for
from pipeline.stage_files import DEFAULT_FILES, READS, WRITES, option, stage_file_names
from support import REPO

STAGES = ("prepare", "sweep", "evaluate", "frontier")


def dvc_stage(name: str) -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][name]


@pytest.mark.parametrize("stage", STAGES)
def test_dvc_cmd_names_every_file_of_the_stage_as_a_dep_or_an_out(stage):
    spec = dvc_stage(stage)
    words = shlex.split(spec["cmd"])
    assert words[:3] == ["python", "-m", f"stages.{stage}"]
    args = parser_for("x", "", stage_file_names(stage)).parse_args(words[3:])
    given = {word[2:].replace("-", "_") for word in words[3:] if word.startswith("--")}
    assert given == set(stage_file_names(stage)), "cmd must name exactly the stage's files"
    outs = set(spec.get("outs", [])) | set(spec.get("metrics", []))
    for name in READS[stage]:
        assert getattr(args, name).as_posix() in spec["deps"], f"{stage} reads {name}: a dep"
    for name in WRITES[stage]:
        assert getattr(args, name).as_posix() in outs, f"{stage} writes {name}: an out"


def test_a_file_read_by_a_stage_is_written_by_the_stage_before_it():
    """dvc.yaml passes one place per file along the pipeline: where a stage's cmd reads a file
    is where the stage that writes it puts it."""
    written = {}
    for stage in STAGES:
        words = shlex.split(dvc_stage(stage)["cmd"])
        args = parser_for("x", "", stage_file_names(stage)).parse_args(words[3:])
        for name in READS[stage]:
            assert getattr(args, name) == written[name], f"{stage}: {option(name)}"
        written.update({name: getattr(args, name) for name in WRITES[stage]})


@pytest.fixture
def project(tmp_path, monkeypatch):
    (tmp_path / "params.yaml").write_text("data: {dataset: digits}\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("stage, option_name, expected", [
    ("evaluate", "--sweep-csv", "run the sweep first"),
    ("frontier", "--evaluation-csv", "run `dvc repro evaluate` first"),
])
def test_a_stage_reads_the_path_it_is_given(project, capsys, stage, option_name, expected):
    main = __import__(f"stages.{stage}", fromlist=["main"]).main
    assert main(["--params", "params.yaml", option_name, "elsewhere/input.csv"]) == EXIT_FAILED
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: elsewhere/input.csv: not found") and expected in err
    assert len(err.splitlines()) == 1


def test_results_tracking_is_given_the_same_paths(project, capsys):
    from pipeline.results.tracking import main
    (project / "elsewhere").mkdir()
    (project / "elsewhere" / "sweep.csv").write_text("trial_id\n")
    assert main(["--sweep-csv", "elsewhere/sweep.csv",
                 "--evaluation-csv", "elsewhere/evaluation.csv"]) == EXIT_FAILED
    assert capsys.readouterr().err.strip() == \
        "error: elsewhere/evaluation.csv: not found; run `dvc repro evaluate` first"


@pytest.mark.parametrize("module", ["stages.prepare", "stages.sweep", "stages.evaluate",
                                    "stages.frontier", "pipeline.results.tracking"])
def test_bad_params_exit_2_in_one_line_before_any_file_is_read(project, capsys, module):
    (project / "params.yaml").write_text("data: {dataset: nosuchset}\n")
    main = __import__(module, fromlist=["main"]).main
    assert main(["--params", "params.yaml"]) == EXIT_BAD_PARAMS
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "data.dataset" in err and len(err.splitlines()) == 1


def test_defaults_are_the_places_dvc_yaml_gives():
    """A stage run by hand (no file options) uses the files `dvc repro` uses."""
    for stage in STAGES:
        words = shlex.split(dvc_stage(stage)["cmd"])
        args = parser_for("x", "", stage_file_names(stage)).parse_args(words[3:])
        for name in stage_file_names(stage):
            assert getattr(args, name) == getattr(DEFAULT_FILES, name), f"{stage}: {name}"
