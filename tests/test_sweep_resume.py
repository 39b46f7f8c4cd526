"""A sweep stopped part-way resumes to what an uninterrupted one gives, for real: a real
SIGINT to the driver's process group (Ctrl-C) once every trial trains, a real tmpfs that fills
during training, an interruption after which the knobs and the tracking store change. Nothing
half-trained is reported complete; the rerun retrains nothing and logs every epoch once.
docs/reliability.md lists what each proves. Every process a test starts is stopped by PID, and
every mount is undone, also on failure."""
from __future__ import annotations

import os
import signal
import subprocess
import time

import pandas as pd
import pytest
from ray import tune

from echo.train import load_checkpoint
from support import SWEEP, child_env, newest_history, stop, trial_checkpoints
from support.mounts import grow, tmpfs
from support.params import write_sweep_params
from support.processes import error_lines
from support.tracking import metric_steps, sweep_runs


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
    write_sweep_params(tmp_path, "knobs", betas=betas)
    first = Starts(stop_after=1)
    with pytest.raises(SweepInterrupted):
        run_sweep(load_params(tmp_path / "params.yaml"), tmp_path, callbacks=(first,),
                  verbose=0)
    assert len(first.started) < len(betas)          # some trials were never created

    write_sweep_params(tmp_path, "knobs", betas=betas, max_concurrent=1, max_failures=3,
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

    client, parents, children = sweep_runs(tmp_path / "new.db", "knobs")
    assert len(parents) == 1 and len(children) == len(betas)
    by_trial = table.set_index("trial_id")
    for child in children:
        history = load_checkpoint(tmp_path / by_trial.loc[child.data.tags["trial_id"],
                                                          "checkpoint"])["history"]
        for name in ("test_neg_elbo", "train_rate"):
            logged = sorted((m.step, m.value)
                            for m in client.get_metric_history(child.info.run_id, name))
            assert logged == [(e["epoch"], pytest.approx(e[name])) for e in history], name



@pytest.mark.slow
def test_interrupt_after_every_trial_started_is_not_reported_complete(tmp_path):
    """SIGINT to the driver's process group (Ctrl-C in its terminal) once both trials have
    written checkpoints: exit 1 in one line, no results/sweep.csv (so DVC records nothing),
    the parent run and both child runs KILLED with status `interrupted`. The rerun resumes
    both trials from their checkpoints (the epochs trained before the interrupt keep their
    wall-clock seconds) and completes every epoch, each logged once."""
    epochs = 60
    write_sweep_params(tmp_path, "ctrlc", betas=[0.5, 1.0], epochs=epochs)
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
        stop(driver)
    assert driver.returncode == 1, stderr[-3000:]
    lines = error_lines(stderr)
    assert len(lines) == 1, lines
    assert "interrupted" in lines[0] and "run the stage again" in lines[0], lines[0]
    assert not (tmp_path / "results" / "sweep.csv").exists()
    before = {name: newest_history(experiment / name) for name in trial_checkpoints(experiment)}
    assert all(0 < len(h) < epochs for h in before.values()), {k: len(h) for k, h in before.items()}

    client, parents, children = sweep_runs(tmp_path / "mlflow.db", "ctrlc")
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
    client, parents, children = sweep_runs(tmp_path / "mlflow.db", "ctrlc")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 2
    for child in children:
        assert child.info.status == "FINISHED" and child.data.tags["status"] == "completed"
        assert metric_steps(client, child.info.run_id) == list(range(1, epochs + 1))


@pytest.mark.slow
def test_storage_that_fills_during_the_sweep_ends_in_one_line_and_resumes(tmp_path):
    """`sweep.storage_path` on a real 12 MiB tmpfs: the start-up probe passes, the trial's
    checkpoints (~4 MB each) fill it during training. The sweep stops in one line naming the
    folder and that a rerun resumes (no traceback; Tune's truncated files used to end it in an
    EOFError, and reruns then trained nothing); the parent run is not left RUNNING. With room
    (the tmpfs grown in place), the rerun completes from the trial's checkpoint."""
    epochs = 8
    write_sweep_params(tmp_path, "full", betas=[1.0], epochs=epochs, max_failures=2)
    storage = tmp_path / "ray_results"
    with tmpfs(storage, "12m"):
        done = subprocess.run(SWEEP, cwd=tmp_path, env=child_env(), capture_output=True,
                              text=True, timeout=900)
        assert done.returncode == 1, done.stderr[-3000:]
        lines = error_lines(done.stderr)
        assert len(lines) == 1, lines
        assert "sweep.storage_path" in lines[0] and str(storage) in lines[0], lines[0]
        assert "No space left on device" in lines[0] or "no space" in lines[0], lines[0]
        assert "run the stage again" in lines[0], lines[0]
        assert not (tmp_path / "results" / "sweep.csv").exists()
        _, parents, children = sweep_runs(tmp_path / "mlflow.db", "full")
        assert [p.info.status for p in parents] == ["KILLED"]
        history = newest_history(storage / "full" / "vae_b1_mlp_z4")
        assert 0 < len(history) < epochs

        grow(storage, "200m")                                         # room again
        again = subprocess.run(SWEEP, cwd=tmp_path, env=child_env(), capture_output=True,
                               text=True, timeout=900)
        assert again.returncode == 0, again.stderr[-3000:]
    table = pd.read_csv(tmp_path / "results" / "sweep.csv")
    assert list(table["status"]) == ["completed"] and list(table["epochs_done"]) == [epochs]
    final = load_checkpoint(tmp_path / table.loc[0, "checkpoint"])["history"]
    assert [e["epoch_seconds"] for e in final[:len(history)]] == \
        [e["epoch_seconds"] for e in history]                  # resumed, not retrained
    client, parents, children = sweep_runs(tmp_path / "mlflow.db", "full")
    assert [p.info.status for p in parents] == ["FINISHED"] and len(children) == 1
    assert metric_steps(client, children[0].info.run_id) == list(range(1, epochs + 1))

