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


# ---------------------------------------------------------------------------------------------
# Case 3: code in the experiment folder
# ---------------------------------------------------------------------------------------------


class _RunsCode:
    """Unpickling this runs a shell command (creates `marker`), as a crafted file would."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.slow
def test_crafted_pickles_in_the_experiment_folder_are_refused_and_never_run(tmp_path,
                                                                           monkeypatch, capsys):
    """A finished tiny sweep; then its `searcher-state-*.pkl`, then its `tuner.pkl`, replaced
    by a pickle that creates a file when loaded (the folder is shared, so anyone who can write
    there could). The rerun (which would resume) exits 1 in one line naming the file, before
    Ray starts; the file is never created, nothing new is trained or tracked. The same bytes
    unpickled directly do create it (the payload is real). A folder signed with another key is
    refused the same way."""
    import pickle

    import ray
    from stages.sweep import main as sweep_main
    monkeypatch.setenv("ECHO_STATE_KEY_FILE", str(tmp_path / "keys" / "state.key"))
    write_params(tmp_path, "shared", betas=[1.0], epochs=1)
    first = subprocess.run(SWEEP, cwd=tmp_path, env=child_env(), capture_output=True,
                           text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    experiment = tmp_path / "ray_results" / "shared"
    marker = tmp_path / "code-ran"
    monkeypatch.chdir(tmp_path)
    payload = pickle.dumps(_RunsCode(marker))
    _, _, children = runs(tmp_path, "shared")
    assert len(children) == 1

    for name in [next(experiment.glob("searcher-state-*.pkl")).name, "tuner.pkl"]:
        original = (experiment / name).read_bytes()
        (experiment / name).write_bytes(payload)
        assert sweep_main(["--params", "params.yaml"]) == 1
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and name in lines[0] and "not signed" in lines[0], lines
        assert not marker.exists(), "code from the experiment folder ran"
        assert not ray.is_initialized()                         # refused before Ray started
        (experiment / name).write_bytes(original)
    _, _, children = runs(tmp_path, "shared")
    assert len(children) == 1

    # Another key (e.g. a copied folder): refused, not loaded.
    (tmp_path / "keys" / "state.key").write_text(os.urandom(32).hex())
    assert sweep_main(["--params", "params.yaml"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "signature does not match" in lines[0], lines

    pickle.loads(payload)                                       # the payload does run
    assert marker.exists()


# ---------------------------------------------------------------------------------------------
# Case 5 (+ 7): credentials and invalid tracking URIs in params.yaml
# ---------------------------------------------------------------------------------------------

PASSWORD = "Pa55w0rd-never-logged"


def stage_mains():
    from stages.evaluate import main as evaluate_main
    from stages.frontier import main as frontier_main
    from stages.prepare import main as prepare_main
    from stages.sweep import main as sweep_main
    return {"prepare": prepare_main, "sweep": sweep_main, "evaluate": evaluate_main,
            "frontier": frontier_main}


@pytest.mark.parametrize("uri, expected", [
    (f"http://alice:{PASSWORD}@127.0.0.1:5000", "MLFLOW_TRACKING_PASSWORD"),
    (f"https://{PASSWORD}@mlflow.example.org", "MLFLOW_TRACKING_USERNAME"),
    (f"postgresql://bob:{PASSWORD}@db.example.org/mlflow", "PGPASSWORD"),
    ("localhost:5000", "http://localhost:5000"),
    ("mlflow.db", "sqlite:///mlflow.db"),
])
def test_credentials_or_non_uris_in_tracking_uri_stop_every_stage(tmp_path, monkeypatch, capsys,
                                                                  uri, expected):
    """A password in tracking.uri (it would reach dvc.lock, logs and Tune's pickled state), or
    a tracking.uri that is not a URI (`localhost:5000`, a bare `mlflow.db`: MLflow reads them
    as something else and failed with a traceback after Ray started): every stage exits 2 with
    one line naming tracking.uri and the fix, never showing the password; nothing written."""
    write_params(tmp_path, "creds", uri=uri)
    monkeypatch.chdir(tmp_path)
    before = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")}
    for stage, main in stage_mains().items():
        assert main(["--params", "params.yaml"]) == 2, stage
        out, err = capsys.readouterr()
        lines = err.strip().splitlines()
        assert len(lines) == 1, (stage, lines)
        assert "tracking.uri" in lines[0] and expected in lines[0], (stage, lines[0])
        assert PASSWORD not in out + err, (stage, out, err)
        assert {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")} == before, stage


# ---------------------------------------------------------------------------------------------
# Case 7: a damaged or read-only store; an experiment folder among the outputs; no leftovers
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def read_only_file(path: Path):
    """`path` read-only even for root: a read-only bind mount onto itself, else `chattr +i`."""
    run = lambda cmd: subprocess.run(cmd, capture_output=True).returncode == 0  # noqa: E731
    if run(["mount", "--bind", "-o", "ro", str(path), str(path)]):
        try:
            yield
        finally:
            assert run(["umount", str(path)]), f"could not unmount {path}"
    elif run(["chattr", "+i", str(path)]):
        try:
            yield
        finally:
            run(["chattr", "-i", str(path)])
    else:
        pytest.skip("cannot make a file read-only here (no mount, no chattr)")


def test_damaged_or_read_only_store_is_refused_before_anything_is_archived(tmp_path,
                                                                           monkeypatch, capsys):
    """An earlier sweep of other params (its experiment folder; its runs in a real mlflow.db);
    then mlflow.db truncated to half, or made read-only: the sweep exits 1 in one line naming
    the file and the fix, before Ray starts, and the earlier experiment is not archived."""
    import ray
    from pipeline.sweep.experiment import experiment_uid, stored_uid
    from pipeline.sweep.runs import SweepRuns
    from stages.sweep import main as sweep_main

    write_params(tmp_path, "store")
    experiment = tmp_path / "ray_results" / "store"
    old_uid, _ = experiment_uid(str(experiment), {"an": "older sweep"})
    db = tmp_path / "mlflow.db"
    old = SweepRuns(f"sqlite:///{db}", "store", "store", old_uid,
                       artifact_root=tmp_path / "mlartifacts").open()
    old.child_run({"trial_id": "vae_b1_mlp_z4", "method": "vae", "dataset": "digits",
                   "beta": 1.0})
    good = db.read_bytes()
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()                                  # MLflow's notes on creating the store

    def refused(*words: str) -> None:
        assert sweep_main(["--params", "params.yaml"]) == 1
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and str(db) in lines[0], lines
        assert all(word in lines[0] for word in words), lines[0]
        assert stored_uid(str(experiment)) == old_uid                  # not archived
        assert not list((tmp_path / "ray_results").glob("store@*"))
        assert not ray.is_initialized()

    db.write_bytes(good[: len(good) // 2])
    refused("damaged", "restore it from a backup")
    db.write_bytes(good)
    with read_only_file(db):
        refused("cannot be written", "make it writable")


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
        write_params(tmp_path, sweep.pop("name", "places"), **sweep)
        before = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")}
        assert sweep_main(["--params", "params.yaml"]) == 1
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], lines
        assert {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")} == before, sweep


def test_hostile_checkpoint_refusal_names_the_reason(tmp_path):
    """The one-line refusal of a checkpoint holding code says what was refused, not torch's
    advice to load it with weights_only=False."""
    import torch
    from echo.train import load_checkpoint

    hostile = tmp_path / "model.pt"
    torch.save({"model": _RunsCode(tmp_path / "ran")}, hostile)
    with pytest.raises(ValueError) as info:
        load_checkpoint(hostile)
    message = str(info.value)
    assert "\n" not in message and str(hostile) in message
    assert "system" in message and "GLOBAL" in message, message
    assert "weights_only" not in message, message
    assert not (tmp_path / "ran").exists()


# ---------------------------------------------------------------------------------------------
# Case 2: the disk of sweep.storage_path fills during the sweep
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_storage_that_fills_during_the_sweep_ends_in_one_line_and_resumes(tmp_path):
    """`sweep.storage_path` on a real 12 MiB tmpfs: the start-up probe passes, the trial's
    checkpoints (~4 MB each) fill it during training. The sweep stops in one line naming the
    folder and that a rerun resumes (no traceback; Tune's truncated files used to end it in an
    EOFError, and reruns then trained nothing); the parent run is not left RUNNING. With room
    (the tmpfs grown in place), the rerun completes from the trial's checkpoint."""
    run = lambda cmd: subprocess.run(cmd, capture_output=True).returncode == 0  # noqa: E731
    epochs = 8
    write_params(tmp_path, "full", betas=[1.0], epochs=epochs, max_failures=2)
    storage = tmp_path / "ray_results"
    storage.mkdir()
    if not run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(storage)]):
        pytest.skip("cannot mount a tmpfs here")
    try:
        done = subprocess.run(SWEEP, cwd=tmp_path, env=child_env(), capture_output=True,
                              text=True, timeout=900)
        assert done.returncode == 1, done.stderr[-3000:]
        lines = error_lines(done.stderr)
        assert len(lines) == 1, lines
        assert "sweep.storage_path" in lines[0] and str(storage) in lines[0], lines[0]
        assert "No space left on device" in lines[0] or "no space" in lines[0], lines[0]
        assert "run the stage again" in lines[0], lines[0]
        assert not (tmp_path / "results" / "sweep.csv").exists()
        _, parents, children = runs(tmp_path, "full")
        assert [p.info.status for p in parents] == ["KILLED"]
        history = newest_history(storage / "full" / "vae_b1_mlp_z4")
        assert 0 < len(history) < epochs

        assert run(["mount", "-o", "remount,size=200m", str(storage)])     # room again
        again = subprocess.run(SWEEP, cwd=tmp_path, env=child_env(), capture_output=True,
                               text=True, timeout=900)
        assert again.returncode == 0, again.stderr[-3000:]
    finally:
        subprocess.run(["umount", "-l", str(storage)], capture_output=True)
    table = pd.read_csv(tmp_path / "results" / "sweep.csv")
    assert list(table["status"]) == ["completed"] and list(table["epochs_done"]) == [epochs]
    final = load_checkpoint(tmp_path / table.loc[0, "checkpoint"])["history"]
    assert [e["epoch_seconds"] for e in final[:len(history)]] == \
        [e["epoch_seconds"] for e in history]                  # resumed, not retrained
    client, parents, children = runs(tmp_path, "full")
    assert [p.info.status for p in parents] == ["FINISHED"] and len(children) == 1
    steps = [m.step for m in client.get_metric_history(children[0].info.run_id, "test_neg_elbo")]
    assert sorted(steps) == list(range(1, epochs + 1))
