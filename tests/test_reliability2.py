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
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from ray import tune

from echo.train import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
SWEEP = [sys.executable, "-m", "stages.sweep", "--params", "params.yaml", "--verbose", "0"]


def write_params(root: Path, name: str, *, betas=(0.5, 1.0), epochs=2, db="mlflow.db",
                 uri=None, **sweep) -> Path:
    """Tiny settings: digits, 200 training images, 4 latents, one VAE trial per beta."""
    raw = {
        "data": {"dataset": "digits"},
        "train": {"epochs": epochs, "batch_size": 50, "lr": 3e-3, "device": "cpu",
                  "beta_warmup_steps": 0},
        "sweep": {"name": name, "methods": ["vae"], "betas": list(betas), "archs": ["mlp"],
                  "latent_dims": [4], "train_limit": 200, "test_limit": 100,
                  "max_concurrent": 2, "max_failures": 0, "checkpoint_every": 1,
                  "checkpoint_min_interval_s": 0, "resources": {"cpu": 1}, **sweep},
        "tracking": {"uri": uri or f"sqlite:///{db}", "experiment": name},
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
    """The error lines the stage wrote (Ray may add a notice about its auth mode; evaluate's
    progress bar, left open by the error, may precede one on its line)."""
    assert "Traceback" not in stderr, stderr[-3000:]
    return [line[line.index("error: "):] for line in stderr.splitlines() if "error: " in line]


def runs(root: Path, experiment: str, db: str = "mlflow.db"):
    client = MlflowClient(f"sqlite:///{root / db}")
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
    from pipeline.sweep.experiment import experiment_uid
    from pipeline.sweep.runs import SweepRuns

    write_params(tmp_path, "nothing", betas=[1e39], epochs=1)
    # What a SIGKILLed driver of other params leaves: its folder, its parent and a child run
    # both RUNNING (made with the real tracker against the real store).
    experiment = tmp_path / "ray_results" / "nothing"
    old_uid, _ = experiment_uid(str(experiment), {"an": "older sweep"})
    old = SweepRuns(f"sqlite:///{tmp_path / 'mlflow.db'}", "nothing", "nothing", old_uid,
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


# ---------------------------------------------------------------------------------------------
# Case 8: resume knobs changed between runs
# ---------------------------------------------------------------------------------------------


class Starts(tune.Callback):
    """When each trial runs (driver clock), with the retry budget and settings it runs with;
    with `stop_after`, stops the sweep as Ctrl-C would (SIGUSR1) once that many completed."""

    def __init__(self, stop_after: int | None = None):
        self.stop_after = stop_after
        self.started: dict[str, float] = {}
        self.ended: dict[str, float] = {}
        self.settings: dict[str, tuple] = {}

    def on_trial_start(self, iteration, trials, trial, **info):
        trial_id = trial.config["trial_id"]
        self.started.setdefault(trial_id, time.monotonic())
        self.settings[trial_id] = (trial.config["checkpoint_every"],
                                   trial.placement_group_factory.required_resources["CPU"])

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.ended[trial.config["trial_id"]] = time.monotonic()
        # the retry budget the trial ran with (what Tune reads when it crashes)
        self.settings[trial.config["trial_id"]] += (trial.max_failures,)
        if self.stop_after is not None and len(self.ended) == self.stop_after:
            os.kill(os.getpid(), signal.SIGUSR1)


@pytest.mark.slow
def test_resume_applies_new_knobs_and_completes_runs_in_a_new_store(tmp_path):
    """Interrupted with max_concurrent 2, max_failures 0, checkpoint_every 1, one CPU per
    trial; resumed with 1, 3, 2, half a CPU: the trials the resumed run starts run one at a
    time, and every trial it runs has the new retry budget, checkpoint interval and resources
    (the restored Tune state kept the old ones).
    The resume also goes to a new tracking store (the old one lost): every trial's child run
    there holds every epoch, those of trials finished before the interruption included, with
    the values of the trial's final checkpoint."""
    from pipeline.config import load_params
    from pipeline.sweep.run import SweepInterrupted, run_sweep

    betas = [0.25, 0.5, 1.0, 2.0]
    write_params(tmp_path, "knobs", betas=betas)
    first = Starts(stop_after=1)
    with pytest.raises(SweepInterrupted):
        run_sweep(load_params(tmp_path / "params.yaml"), tmp_path, callbacks=(first,),
                  verbose=0)
    assert len(first.started) < len(betas)          # some trials were never created

    write_params(tmp_path, "knobs", betas=betas, max_concurrent=1, max_failures=3,
                 checkpoint_every=2, resources={"cpu": 0.5}, db="new.db")
    second = Starts()
    table = run_sweep(load_params(tmp_path / "params.yaml"), tmp_path, callbacks=(second,),
                      verbose=0)
    assert set(table["status"]) == {"completed"} and len(table) == len(betas)
    assert set(second.settings.values()) == {(2, 0.5, 3)}, second.settings
    # Trials created by the resumed run: none ran beside another trial. (Trials that were in
    # flight at the interruption restart together: Tune requeues them all.)
    new = set(second.started) - set(first.started)
    assert new, "the resumed run created no trial"
    for trial in new:
        for other in second.started:
            if other != trial:
                apart = (second.ended[other] <= second.started[trial]
                         or second.ended[trial] <= second.started[other])
                assert apart, (trial, other, second.started, second.ended)

    client, parents, children = runs(tmp_path, "knobs", db="new.db")
    assert len(parents) == 1 and len(children) == len(betas)
    by_trial = table.set_index("trial_id")
    for child in children:
        history = load_checkpoint(tmp_path / by_trial.loc[child.data.tags["trial_id"],
                                                          "checkpoint"])["history"]
        for name in ("test_neg_elbo", "train_rate"):
            logged = sorted((m.step, m.value)
                            for m in client.get_metric_history(child.info.run_id, name))
            assert logged == [(e["epoch"], pytest.approx(e[name])) for e in history], name


# ---------------------------------------------------------------------------------------------
# Case 5: the tracking server goes away mid-sweep
# ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_mlflow_server(db: Path, port: int, log: Path) -> subprocess.Popen:
    """A real `mlflow server` on 127.0.0.1 over a SQLite file, in its own session; returns
    once it answers /health."""
    import urllib.request
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri",
         f"sqlite:///{db}", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env=child_env(), start_new_session=True, stdout=open(log, "ab"),
        stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while True:
        assert server.poll() is None, log.read_text()[-3000:]
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
                if reply.status == 200:
                    return server
        assert time.monotonic() < deadline, "mlflow server did not start"
        time.sleep(0.5)


def stop(proc: subprocess.Popen) -> None:
    """SIGKILL a process and its session (the server's workers), then reap it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def metric_rows(db: Path, experiment: str) -> int:
    """Metric rows of an experiment in the server's store (read-only, tolerant of a busy file)."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True,
                                                timeout=5)) as con:
            return con.execute(
                "SELECT count(*) FROM metrics m JOIN runs r ON m.run_uuid = r.run_uuid "
                "JOIN experiments e ON r.experiment_id = e.experiment_id WHERE e.name = ?",
                (experiment,)).fetchone()[0]
    except sqlite3.Error:
        return 0


def trained_epochs(folder: Path) -> int:
    """Checkpoints written so far by the trials in an experiment folder (each trial's highest
    checkpoint index + 1; older folders are deleted, the index keeps counting)."""
    return sum(1 + max((int(c.name.split("_")[1]) for c in t.glob("checkpoint_*")), default=-1)
               for t in folder.glob("vae_*") if t.is_dir())


def wait_for(condition, timeout: float, what: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the driver ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


@pytest.mark.slow
def test_tracking_server_outage_is_bridged_or_ends_in_one_line(tmp_path):
    """A real `mlflow server` is SIGKILLed mid-sweep. Restarted a little later: the trials
    trained on meanwhile, the driver wrote what it had buffered, the sweep ends 0 with every
    epoch logged once. Left dead (with the wait bounded at 10 s): the stage stops, exit 1, in
    one line that names the store and says a rerun resumes, instead of blocking ~4 minutes a
    call and ending in tracebacks."""
    from mlflow.tracking import MlflowClient

    db, port, log = tmp_path / "server.db", free_port(), tmp_path / "server.log"
    uri = f"http://127.0.0.1:{port}"
    write_params(tmp_path, "outage", betas=[0.5, 1.0], epochs=6, max_concurrent=1, uri=uri)
    server = start_mlflow_server(db, port, log)
    driver = None
    try:
        with open(tmp_path / "driver.err", "w") as err:
            driver = subprocess.Popen(SWEEP, cwd=tmp_path, env=child_env(),
                                      start_new_session=True, stdout=subprocess.DEVNULL,
                                      stderr=err)
            wait_for(lambda: metric_rows(db, "outage") > 0, 600, "a first metric", driver)
            stop(server)                                         # the fault
            done = trained_epochs(tmp_path / "ray_results" / "outage")
            wait_for(lambda: trained_epochs(tmp_path / "ray_results" / "outage") >= done + 2,
                     300, "training while the store is away", driver)
            server = start_mlflow_server(db, port, log)          # it comes back
            assert driver.wait(timeout=600) == 0, (tmp_path / "driver.err").read_text()[-3000:]
        stderr = (tmp_path / "driver.err").read_text()
        assert "Traceback" not in stderr and "unreachable" in stderr and "is back" in stderr
        client = MlflowClient(uri)
        found = client.get_experiment_by_name("outage")
        everything = client.search_runs([found.experiment_id])
        parents = [r for r in everything if r.data.tags.get("echo.role") == "sweep"]
        children = [r for r in everything if r.data.tags.get("echo.role") == "trial"]
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        assert len(children) == 2
        for child in children:
            assert child.info.status == "FINISHED"
            steps = [m.step for m in client.get_metric_history(child.info.run_id,
                                                                "test_neg_elbo")]
            assert sorted(steps) == list(range(1, 7)), steps    # every epoch, once

        # Left dead: a bounded wait, then one line.
        write_params(tmp_path, "outage2", betas=[1.0], epochs=6, uri=uri)
        before = metric_rows(db, "outage2")
        driver = subprocess.Popen(SWEEP, cwd=tmp_path,
                                  env={**child_env(), "ECHO_TRACKING_MAX_OUTAGE_S": "10"},
                                  start_new_session=True, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True)
        wait_for(lambda: metric_rows(db, "outage2") > before, 600, "a first metric", driver)
        stop(server)
        killed = time.monotonic()
        _, stderr = driver.communicate(timeout=400)
        assert driver.returncode == 1, stderr[-3000:]
        assert time.monotonic() - killed < 10 + 180              # bounded, not ~4 min a call
        lines = error_lines(stderr)
        assert len(lines) == 1, lines
        assert uri in lines[0] and "unreachable" in lines[0] and "run the stage again" in lines[0]
    finally:
        if driver is not None:
            stop(driver)
        stop(server)
