"""Reliability, round two (issue 17): faults that used to lose or duplicate tracked results, or
end with exit 0 and no results. Each is injected for real: a real second driver, a missing
device, a sweep whose every trial diverges, a real read-only or full directory (a read-only
bind mount and a tiny tmpfs: the tests run as root, for whom permission bits do not stop a
write; `chattr +i` where mounts are not allowed). docs/reliability.md lists what each proves.

Every process a test starts is stopped by PID, and every mount is undone, also on failure.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from echo.train import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
SWEEP = [sys.executable, "-m", "stages.sweep", "--params", "params.yaml", "--verbose", "0"]


def write_params(root: Path, name: str, *, betas=(0.5, 1.0), epochs=2, **sweep) -> Path:
    """Tiny settings: digits, 200 training images, 4 latents, one VAE trial per beta."""
    raw = {
        "data": {"dataset": "digits"},
        "train": {"epochs": epochs, "batch_size": 50, "lr": 3e-3, "device": "cpu",
                  "beta_warmup_steps": 0},
        "sweep": {"name": name, "methods": ["vae"], "betas": list(betas), "archs": ["mlp"],
                  "latent_dims": [4], "train_limit": 200, "test_limit": 100,
                  "max_concurrent": 2, "max_failures": 0, "checkpoint_every": 1,
                  "checkpoint_min_interval_s": 0, "resources": {"cpu": 1}, **sweep},
        "tracking": {"uri": "sqlite:///mlflow.db", "experiment": name},
        "evaluate": {"iwae_k": 4, "batch_size": 50, "test_limit": 100},
        "frontier": {"recon_samples": 2},
    }
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def child_env() -> dict:
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


@contextlib.contextmanager
def drivers(root: Path, count: int):
    """`count` sweep drivers started at once, each in its own session; on exit every process
    of their trees (their local Ray included) is killed by PID."""
    procs = [subprocess.Popen(SWEEP, cwd=root, env=child_env(), start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(count)]
    try:
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)


def error_lines(stderr: str) -> list[str]:
    """The lines the stage itself wrote (Ray may add a notice line about its auth mode)."""
    assert "Traceback" not in stderr, stderr[-3000:]
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def runs(root: Path, experiment: str):
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    found = client.get_experiment_by_name(experiment)
    everything = client.search_runs([found.experiment_id], max_results=1000) if found else []
    parents = [r for r in everything if r.data.tags.get("echo.role") == "sweep"]
    children = [r for r in everything if r.data.tags.get("echo.role") == "trial"]
    return client, parents, children


def snapshot(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


# ---------------------------------------------------------------------------------------------
# Case 1 (+ case 9's hint): two drivers of one sweep, started at once on a fresh store
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_second_driver_refuses_naming_the_running_one(tmp_path, monkeypatch, capsys):
    """Two `python -m stages.sweep` at the same moment, no mlflow.db yet: one trains, the
    other refuses in one line naming the first one's pid (no alembic race, no duplicate
    runs or epochs). Then evaluate's hint for a damaged checkpoint is followed and works."""
    from stages.evaluate import main as evaluate_main
    from stages.prepare import main as prepare_main

    write_params(tmp_path, "dup")
    monkeypatch.chdir(tmp_path)
    assert prepare_main(["--params", "params.yaml"]) == 0
    with drivers(tmp_path, 2) as procs:
        errs = [proc.communicate(timeout=900)[1] for proc in procs]
    codes = [proc.returncode for proc in procs]
    assert sorted(codes) == [0, 1], (codes, [e[-2000:] for e in errs])
    winner, loser = (procs[0], procs[1]) if codes[0] == 0 else (procs[1], procs[0])
    lines = error_lines(errs[procs.index(loser)])
    assert len(lines) == 1, lines
    assert "already running" in lines[0] and f"pid {winner.pid} " in lines[0], lines[0]
    assert "stages.sweep" in lines[0]                      # names the running command

    trials = {"vae_b0.5_mlp_z4", "vae_b1_mlp_z4"}
    client, parents, children = runs(tmp_path, "dup")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(c.data.tags["trial_id"] for c in children) == sorted(trials)
    for child in children:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "test_neg_elbo")]
        assert sorted(steps) == [1, 2], steps                 # every epoch logged once
    table = pd.read_csv(tmp_path / "results/sweep.csv").set_index("trial_id")
    assert set(table.index) == trials and set(table["status"]) == {"completed"}

    # Case 9: a damaged checkpoint. The hint names what restores it; deleting does not.
    target = tmp_path / table.loc["vae_b1_mlp_z4", "checkpoint"]
    good = load_checkpoint(target)["history"]
    target.write_bytes(target.read_bytes()[:100])
    assert evaluate_main(["--params", "params.yaml"]) == 1
    err = error_lines(capsys.readouterr().err)           # (beside evaluate's progress bar)
    assert len(err) == 1 and str(target.relative_to(tmp_path)) in err[0], err
    assert "dvc repro -f sweep" in err[0] and "delete it" not in err[0], err[0]
    # What `dvc repro -f sweep` runs: the finished experiment is resumed, nothing retrains,
    # the checkpoints are rewritten from it, and MLflow gains no run or epoch.
    again = subprocess.run(SWEEP, cwd=tmp_path, env=child_env(), capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert load_checkpoint(target)["history"] == good
    client, parents, children = runs(tmp_path, "dup")
    assert len(parents) == 1 and len(children) == 2
    for child in children:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "test_neg_elbo")]
        assert sorted(steps) == [1, 2], steps


# ---------------------------------------------------------------------------------------------
# Case 2: a device this machine lacks; a sweep in which no trial completed
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_missing_device_or_gpus_are_refused_before_anything_starts(tmp_path, monkeypatch,
                                                                   capsys):
    """`train.device: cuda` without CUDA: one line naming the field, before Ray starts and
    before anything is written. `sweep.resources.gpu: 1` with a local Ray that found no GPU
    (which used to wait forever): one line naming that field, in seconds."""
    from stages.sweep import main as sweep_main

    params = write_params(tmp_path, "nocuda")
    raw = yaml.safe_load(params.read_text())
    raw["train"]["device"] = "cuda"
    params.write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    assert sweep_main(["--params", "params.yaml"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "train.device='cuda'" in lines[0] and "CUDA" in lines[0], lines
    assert snapshot(tmp_path) == before                   # no Ray folder, store or results

    raw["train"]["device"] = "cpu"
    raw["sweep"]["resources"]["gpu"] = 1
    params.write_text(yaml.safe_dump(raw))
    start = time.monotonic()
    done = subprocess.run(SWEEP, cwd=tmp_path, env=child_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    lines = error_lines(done.stderr)
    assert len(lines) == 1 and "sweep.resources.gpu=1" in lines[0], lines
    assert time.monotonic() - start < 60                   # refused before Ray starts
    assert not (tmp_path / "ray_results" / "nocuda").exists()
    assert not (tmp_path / "mlflow.db").exists()          # no parent run left RUNNING
    assert not (tmp_path / "results" / "sweep.csv").exists()


@pytest.mark.slow
def test_sweep_without_a_completed_trial_fails_and_closes_old_runs(tmp_path):
    """Every trial diverges (beta = 1e39 overflows float32 at the first step): the stage exits
    1 with one line, writes no results/sweep.csv (DVC records nothing) and ends its MLflow
    runs as FAILED. The folder and runs of an earlier sweep with other params, left open by
    a killed driver, are archived and closed (KILLED), not left RUNNING."""
    from pipeline.sweep import experiment_uid
    from pipeline.tracking import SweepTracker

    write_params(tmp_path, "nothing", betas=[1e39], epochs=1)
    # What a SIGKILLed driver of other params leaves: its folder, its parent and a child run
    # both RUNNING (made with the real tracker against the real store).
    experiment = tmp_path / "ray_results" / "nothing"
    old_uid, _ = experiment_uid(str(experiment), {"an": "older sweep"})
    old = SweepTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "nothing", "nothing", old_uid,
                       artifact_root=tmp_path / "mlartifacts").open()
    old_child = old.child_run({"trial_id": "vae_b1_mlp_z4", "method": "vae",
                               "dataset": "digits", "beta": 1.0})

    done = subprocess.run(SWEEP, cwd=tmp_path, env=child_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 1, done.stderr[-3000:]
    lines = error_lines(done.stderr)
    assert len(lines) == 1, lines
    assert "no trial completed (1 nonfinite" in lines[0] and "non-finite" in lines[0], lines[0]
    assert not (tmp_path / "results" / "sweep.csv").exists()
    assert (tmp_path / "ray_results" / f"nothing@{old_uid[:8]}").is_dir()    # archived

    client, parents, children = runs(tmp_path, "nothing")
    status = {r.info.run_id: r.info.status for r in parents + children}
    assert status[old.parent_id] == "KILLED" and status[old_child] == "KILLED"
    assert client.get_run(old_child).data.tags["status"] == "interrupted"
    new_parent = [p for p in parents if p.info.run_id != old.parent_id]
    new_child = [c for c in children if c.info.run_id != old_child]
    assert len(new_parent) == 1 and status[new_parent[0].info.run_id] == "FAILED"
    assert len(new_child) == 1 and status[new_child[0].info.run_id] == "FAILED"
    assert new_child[0].data.tags["status"] == "nonfinite"


# ---------------------------------------------------------------------------------------------
# Case 6: outputs that cannot be written
# ---------------------------------------------------------------------------------------------


def _run(cmd: list[str]) -> bool:
    return subprocess.run(cmd, capture_output=True).returncode == 0


@contextlib.contextmanager
def unwritable(folder: Path):
    """`folder` made unwritable even for root: a read-only bind mount onto itself, else the
    immutable attribute (`chattr +i`); skipped where neither is allowed."""
    folder.mkdir(parents=True, exist_ok=True)
    if _run(["mount", "--bind", "-o", "ro", str(folder), str(folder)]):
        try:
            yield "read-only bind mount"
        finally:
            assert _run(["umount", str(folder)]), f"could not unmount {folder}"
    elif _run(["chattr", "+i", str(folder)]):
        try:
            yield "chattr +i"
        finally:
            _run(["chattr", "-i", str(folder)])
    else:
        pytest.skip("cannot make a folder unwritable here (no mount, no chattr)")


@contextlib.contextmanager
def full(folder: Path):
    """`folder` as a 64 KiB tmpfs: a write of the probe's size fails with ENOSPC."""
    folder.mkdir(parents=True, exist_ok=True)
    if not _run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)]):
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield "full tmpfs"
    finally:
        assert _run(["umount", str(folder)]), f"could not unmount {folder}"


def test_unwritable_outputs_are_refused_before_training(tmp_path, monkeypatch, capsys):
    """Read-only results/, a full results/, a file where results/ should be, a read-only
    storage_path: exit 1 before Ray starts, one line naming the folder (or field) and why; no
    MLflow store or run, no experiment folder."""
    from stages.sweep import main as sweep_main

    write_params(tmp_path, "ro")
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
    with full(results):
        refused("results/", "No space left on device")
    results.rmdir()
    results.write_text("a file where the results folder belongs\n")
    refused("results/", "File exists")
    results.unlink()
    with unwritable(tmp_path / "ray_results") as how:
        refused("sweep.storage_path", "Read-only file system" if "mount" in how else
                "not permitted")
