"""What the sweep refuses before it starts anything (no Ray, no MLflow store or run, no
experiment folder, nothing left behind), each for real: a device this machine lacks, GPUs a
local Ray would not have, output folders that take no write (a real read-only bind mount and a
real tiny tmpfs: the tests run as root, for whom permission bits do not stop a write), an
experiment folder among the stage's own outputs. docs/reliability.md lists what each proves."""
from __future__ import annotations

import subprocess
import time

import pytest
import torch
import yaml

from support import SWEEP, child_env, snapshot
from support.mounts import tmpfs, unwritable
from support.params import write_sweep_params
from support.processes import error_lines


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_missing_device_or_gpus_are_refused_before_anything_starts(tmp_path, monkeypatch,
                                                                   capsys):
    """`train.device: cuda` without CUDA: one line naming the field, before Ray starts and
    before anything is written. `sweep.resources.gpu: 1` with a local Ray that found no GPU
    (which used to wait forever): one line naming that field, in seconds."""
    from stages.sweep import main as sweep_main

    params = write_sweep_params(tmp_path, "nocuda")
    raw = yaml.safe_load(params.read_text())
    raw["train"]["device"] = "cuda"
    params.write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    assert sweep_main(["--params", "params.yaml"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "train.device='cuda'" in lines[0] and "CUDA" in lines[0], lines
    assert snapshot(tmp_path) == before                   # no Ray folder, store or results
    # evaluate runs the models on train.device too: the same line, nothing written
    from stages.evaluate import main as evaluate_main
    assert evaluate_main(["--params", "params.yaml"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "train.device='cuda'" in lines[0] and "CUDA" in lines[0], lines
    assert snapshot(tmp_path) == before

    raw["train"]["device"] = "cpu"
    raw["sweep"]["resources"]["gpu"] = 1
    params.write_text(yaml.safe_dump(raw))
    start = time.monotonic()
    ray_tmp = tmp_path.parent / f"{tmp_path.name}-ray"      # where a Ray started would write
    done = subprocess.run(SWEEP, cwd=tmp_path, env=child_env(RAY_TMPDIR=str(ray_tmp)),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    lines = error_lines(done.stderr)
    assert len(lines) == 1 and "sweep.resources.gpu=1" in lines[0], lines
    assert not ray_tmp.exists()                              # refused before Ray started
    assert time.monotonic() - start < 120                    # in seconds, not a hang
    assert not (tmp_path / "ray_results" / "nocuda").exists()
    assert not (tmp_path / "mlflow.db").exists()          # no parent run left RUNNING
    assert not (tmp_path / "results" / "sweep.csv").exists()


def test_unwritable_outputs_are_refused_before_training(tmp_path, monkeypatch, capsys):
    """Read-only results/, a full results/, a file where results/ should be, a read-only
    storage_path: exit 1 before Ray starts, one line naming the folder (or field) and why; no
    MLflow store or run, no experiment folder."""
    from stages.sweep import main as sweep_main

    write_sweep_params(tmp_path, "ro")
    monkeypatch.chdir(tmp_path)

    def refused(expected: str, reason: str) -> None:
        assert sweep_main(["--params", "params.yaml"]) == 1
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0] and reason in lines[0], lines
        assert not (tmp_path / "mlflow.db").exists()
        assert not (tmp_path / "ray_results" / "ro").exists()

    results = tmp_path / "results"
    with unwritable(results) as how:
        refused("results/", "Read-only file system" if "mount" in how else "not permitted")
    with tmpfs(results):
        refused("results/", "No space left on device")
    results.rmdir()
    results.write_text("a file where the results folder belongs\n")
    refused("results/", "File exists")
    results.unlink()
    with unwritable(tmp_path / "ray_results") as how:
        refused("sweep.storage_path", "Read-only file system" if "mount" in how else
                "not permitted")



def test_experiment_folder_among_the_outputs_and_refusals_leave_nothing(tmp_path, monkeypatch,
                                                                         capsys):
    """`storage_path: results` with `name: checkpoints` (the stage's own checkpoints folder,
    which it swaps for a new one): refused in one line naming both fields. That refusal and a
    GPU refusal leave no folder behind (results/, ray_results/, mlartifacts/ were left empty)."""
    from stages.sweep import main as sweep_main
    import torch

    monkeypatch.chdir(tmp_path)
    cases = [({"storage_path": "results", "name": "checkpoints"}, "sweep.storage_path='results'"),
             ({"storage_path": ".", "name": "results"}, "sweep.name='results'")]
    if not torch.cuda.is_available():
        cases.append(({"resources": {"cpu": 1, "gpu": 1}}, "sweep.resources.gpu=1"))
    for sweep, expected in cases:
        write_sweep_params(tmp_path, sweep.pop("name", "places"), **sweep)
        before = snapshot(tmp_path)
        assert sweep_main(["--params", "params.yaml"]) == 1
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], lines
        assert snapshot(tmp_path) == before, sweep

