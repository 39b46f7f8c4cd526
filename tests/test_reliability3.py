"""Reliability and security, round three (issue 27): faults that reported half-trained models as
complete, ran code from the experiment folder, leaked credentials or left a damaged store to be
found after the old experiment was archived. Each is injected for real: a real SIGINT to the
driver's process group once every trial trains, a real crafted pickle that would create a file,
a real password URI searched for in every file the sweep writes, a real truncated and a real
read-only mlflow.db. docs/reliability.md lists what each proves.

Every process a test starts is stopped by PID, and every mount is undone, also on failure.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from echo.train import load_checkpoint
from test_reliability2 import SWEEP, child_env, error_lines, runs, write_params


def trial_checkpoints(folder: Path) -> dict[str, list[Path]]:
    """trial id -> its checkpoint folders in the Tune experiment folder."""
    return {t.name: sorted(t.glob("checkpoint_*")) for t in folder.glob("vae_*") if t.is_dir()}


def newest_history(folder: Path) -> list[dict]:
    """The per-epoch history of a trial's furthest intact checkpoint."""
    best: list[dict] = []
    for checkpoint in folder.glob("checkpoint_*"):
        with contextlib.suppress(Exception):
            history = load_checkpoint(checkpoint / "model.pt")["history"]
            if len(history) > len(best):
                best = history
    return best


def stop_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


# ---------------------------------------------------------------------------------------------
# Case 1: Ctrl-C once every trial has started
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_interrupt_after_every_trial_started_is_not_reported_complete(tmp_path):
    """SIGINT to the driver's process group (Ctrl-C in its terminal) once both trials have
    written checkpoints: exit 1 in one line, no results/sweep.csv (so DVC records nothing),
    the parent run and both child runs KILLED with status `interrupted`. The rerun resumes
    both trials from their checkpoints (the epochs trained before the interrupt keep their
    wall-clock seconds) and completes every epoch, each logged once."""
    epochs = 60
    write_params(tmp_path, "ctrlc", betas=[0.5, 1.0], epochs=epochs)
    experiment = tmp_path / "ray_results" / "ctrlc"
    driver = subprocess.Popen(SWEEP, cwd=tmp_path, env=child_env(), start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            found = trial_checkpoints(experiment)
            if len(found) == 2 and all(len(c) >= 2 for c in found.values()):
                break
            assert driver.poll() is None, driver.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the trials did not start"
            time.sleep(0.2)
        os.killpg(driver.pid, signal.SIGINT)                       # Ctrl-C
        _, stderr = driver.communicate(timeout=300)
    finally:
        stop_group(driver)
    assert driver.returncode == 1, stderr[-3000:]
    lines = error_lines(stderr)
    assert len(lines) == 1, lines
    assert "interrupted" in lines[0] and "run the stage again" in lines[0], lines[0]
    assert not (tmp_path / "results" / "sweep.csv").exists()
    before = {name: newest_history(experiment / name) for name in trial_checkpoints(experiment)}
    assert all(0 < len(h) < epochs for h in before.values()), {k: len(h) for k, h in before.items()}

    client, parents, children = runs(tmp_path, "ctrlc")
    assert len(parents) == 1 and parents[0].info.status == "KILLED"
    assert len(children) == 2
    for child in children:
        assert child.info.status == "KILLED", child.info
        assert child.data.tags["status"] == "interrupted", child.data.tags

    again = subprocess.run(SWEEP, cwd=tmp_path, env=child_env(), capture_output=True,
                           text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    table = pd.read_csv(tmp_path / "results" / "sweep.csv").set_index("trial_id")
    assert set(table["status"]) == {"completed"} and set(table["epochs_done"]) == {epochs}
    for trial, history in before.items():
        final = load_checkpoint(tmp_path / table.loc[trial, "checkpoint"])["history"]
        assert len(final) == epochs
        # resumed, not retrained: the epochs before the interrupt are the same epochs
        assert [e["epoch_seconds"] for e in final[:len(history)]] == \
            [e["epoch_seconds"] for e in history], trial
    client, parents, children = runs(tmp_path, "ctrlc")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 2
    for child in children:
        assert child.info.status == "FINISHED" and child.data.tags["status"] == "completed"
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "test_neg_elbo")]
        assert sorted(steps) == list(range(1, epochs + 1))
