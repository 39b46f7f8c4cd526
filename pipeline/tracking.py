"""MLflow tracking of a sweep: one parent run per sweep, one child run per trial.

Every MLflow call happens in the Ray Tune *driver* (this module is a Tune `Callback`), never in
the trials. The trials only report results to Tune; the driver is the single writer of the
tracking store, so any number of concurrent trials share a SQLite store without
"database is locked".

Runs are found again, not re-created, when a sweep resumes: the parent by the sweep's
instance id (tag `echo.sweep_uid`, written once per experiment directory), a child by the
trial's readable id (tag `trial_id`). Epochs a child already holds are not logged twice.

A packed Tune trial (`sweep.pack_betas`: all betas in one ensemble) gets one child run per
beta, the same as unpacked trials: every hook goes through `trial_members`.
"""
from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from ray import tune

from pipeline.sweep import (EPOCH_METRICS, MODEL_FILE, RECONSTRUCTIONS_FILE, member_folder,
                            member_result, trial_error_text, trial_members)

TRIAL_PARAMS = ("method", "dataset", "arch", "latent_dim", "beta", "seed", "lr", "clip_factor",
                "epochs", "batch_size")
SWEEP_UID_TAG = "echo.sweep_uid"
ROLE_TAG = "echo.role"
PARENT_TAG = "mlflow.parentRunId"


def resolve_tracking_uri(uri: str, root: Path) -> str:
    """A relative SQLite URI (`sqlite:///mlflow.db`) is taken relative to the project root, so
    the store does not depend on the directory the driver happens to run in."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str((root / uri[len(prefix):]).resolve())
    return uri


@contextlib.contextmanager
def store_lock(uri: str):
    """Serialise the first use of a SQLite store among drivers on this machine: two drivers
    creating the schema of a new mlflow.db at once fail (`_alembic_tmp_experiments already
    exists`). Other stores need no lock here."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        yield
        return
    from filelock import FileLock
    db = Path(uri[len(prefix):].split("?", 1)[0])
    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(db) + ".lock", timeout=600):
        yield


class SweepTracker(tune.Callback):
    """Ray Tune callback that mirrors a sweep into MLflow from the driver."""

    def __init__(self, uri: str, experiment: str, sweep_name: str, sweep_uid: str, *,
                 artifact_root: Path, parent_params: dict | None = None,
                 flush_seconds: float = 10.0):
        self.uri = uri
        self.experiment = experiment
        self.sweep_name = sweep_name
        self.sweep_uid = sweep_uid
        self.artifact_root = artifact_root
        self.parent_params = dict(parent_params or {})
        self.client: MlflowClient | None = None
        self.experiment_id: str | None = None
        self.parent_id: str | None = None
        self._children: dict[str, str] = {}       # trial_id -> run id
        self._last_step: dict[str, int] = {}      # trial_id -> last epoch logged
        self._pending: dict[str, list[Metric]] = {}   # trial_id -> metrics not yet written
        self._flushed: dict[str, float] = {}      # trial_id -> time.monotonic() of last write
        self.flush_seconds = flush_seconds

    def __getstate__(self):
        # Tune pickles its callbacks with the experiment; a connection is not state.
        return {**self.__dict__, "client": None, "_children": {}, "_last_step": {},
                "_pending": {}, "_flushed": {}}

    # -- runs ------------------------------------------------------------------------------
    def open(self) -> "SweepTracker":
        """Connect, and find or create the experiment and this sweep's parent run."""
        if self.client is not None:
            return self
        self.client = MlflowClient(tracking_uri=self.uri)
        with store_lock(self.uri):
            self.experiment_id = self._experiment_id()
        parents = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{SWEEP_UID_TAG}` = '{self.sweep_uid}' "
                          f"and tags.`{ROLE_TAG}` = 'sweep'")
        if parents:
            self.parent_id = parents[0].info.run_id
            self.client.update_run(self.parent_id, status="RUNNING")
        else:
            run = self.client.create_run(
                self.experiment_id, run_name=self.sweep_name,
                tags={SWEEP_UID_TAG: self.sweep_uid, ROLE_TAG: "sweep", "sweep": self.sweep_name})
            self.parent_id = run.info.run_id
            self.client.log_batch(self.parent_id, params=[
                Param(k, _param_text(v)) for k, v in self.parent_params.items()])
        return self

    def _experiment_id(self) -> str:
        """Find or create the experiment. Another sweep's driver may create it between the
        look-up and the creation (a server store has no lock): then it is found again."""
        from mlflow.exceptions import MlflowException
        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        self.artifact_root.mkdir(parents=True, exist_ok=True)
        try:
            return self.client.create_experiment(
                self.experiment, artifact_location=self.artifact_root.resolve().as_uri())
        except MlflowException:
            found = self.client.get_experiment_by_name(self.experiment)
            if found is None:
                raise
            return found.experiment_id

    def close_sweep(self, sweep_uid: str, status: str = "KILLED") -> int:
        """End the parent and child runs of another (archived) sweep of this experiment that
        are still RUNNING: its driver was killed or interrupted, and it will never resume.
        Returns how many runs were closed."""
        self.open()
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{SWEEP_UID_TAG}` = '{sweep_uid}' and attributes.status = "
                          f"'RUNNING'", max_results=50000)
        for run in runs:
            if run.data.tags.get(ROLE_TAG) == "trial" and \
                    run.data.tags.get("status") == "running":
                self.client.set_tag(run.info.run_id, "status", "interrupted")
            self.client.set_terminated(run.info.run_id, status)
        return len(runs)

    def child_runs(self) -> dict[str, str]:
        """trial_id -> child run id, for every child of this sweep's parent run."""
        self.open()
        runs = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{self.parent_id}'",
            max_results=50000)
        return {r.data.tags["trial_id"]: r.info.run_id for r in runs if "trial_id" in r.data.tags}

    def child_run(self, config: dict) -> str:
        """The child run of a trial, created (with its params and tags) only the first time."""
        self.open()
        trial_id = config["trial_id"]
        if trial_id in self._children:
            return self._children[trial_id]
        existing = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{self.parent_id}' "
                          f"and tags.trial_id = '{trial_id}'")
        if existing:
            run_id = existing[0].info.run_id
            history = self.client.get_metric_history(run_id, "test_neg_elbo")
            self._last_step[trial_id] = max((m.step for m in history), default=0)
            self.client.update_run(run_id, status="RUNNING")
        else:
            run_id = self.client.create_run(
                self.experiment_id, run_name=trial_id,
                tags={PARENT_TAG: self.parent_id, SWEEP_UID_TAG: self.sweep_uid,
                      ROLE_TAG: "trial", "trial_id": trial_id, "method": config["method"],
                      "dataset": config["dataset"], "beta": _param_text(config["beta"]),
                      "seed": _param_text(config.get("seed")), "status": "running"}).info.run_id
            self.client.log_batch(run_id, params=[
                Param(k, _param_text(config.get(k))) for k in TRIAL_PARAMS])
            self._last_step[trial_id] = 0
        self._children[trial_id] = run_id
        return run_id

    def log_epoch(self, config: dict, result: dict) -> None:
        """The six per-epoch metrics (nats) with step = epoch, each epoch at most once."""
        trial_id = config["trial_id"]
        run_id = self.child_run(config)
        epoch = int(result["epoch"])
        if epoch <= self._last_step.get(trial_id, 0):
            return                       # re-run after a restore from an earlier checkpoint
        now_ms = int(time.time() * 1000)
        pending = self._pending.setdefault(trial_id, [])
        pending += [Metric(k, float(result[k]), now_ms, epoch)
                    for k in EPOCH_METRICS if k in result and math.isfinite(result[k])]
        self._last_step[trial_id] = epoch
        # Written at every checkpoint (so whatever a resumed trial does not re-run is in the
        # store) and every few seconds (a live UI), not per epoch: the driver shares the
        # machine with the trials.
        if result.get("checkpoint_dir_name") or \
                time.monotonic() - self._flushed.get(trial_id, 0.0) > self.flush_seconds:
            self.flush(trial_id)

    def flush(self, trial_id: str | None = None) -> None:
        """Write buffered epoch metrics (of one trial, or of all)."""
        for key in [trial_id] if trial_id is not None else list(self._pending):
            pending = self._pending.pop(key, [])
            for start in range(0, len(pending), 1000):      # MLflow's batch limit
                self.client.log_batch(self._children[key], metrics=pending[start:start + 1000])
            self._flushed[key] = time.monotonic()

    def finish_trial(self, config: dict, status: str, error: str = "",
                     checkpoint: tune.Checkpoint | None = None, folder: str = "") -> None:
        """Status tags and artifacts (final checkpoint, reconstruction grid, found in `folder`
        of the checkpoint: a packed trial's member_<k>); idempotent."""
        run_id = self.child_run(config)
        self.flush(config["trial_id"])
        run = self.client.get_run(run_id)
        if run.data.tags.get("status") == status and run.info.status != "RUNNING":
            return
        tags = [RunTag("status", status)]
        if error:
            tags.append(RunTag("error", error[:4000]))
        self.client.log_batch(run_id, tags=tags)
        if checkpoint is not None and status == "completed":
            with checkpoint.as_directory() as local:
                for name in (MODEL_FILE, RECONSTRUCTIONS_FILE):
                    if (Path(local) / folder / name).exists():
                        self.client.log_artifact(run_id, str(Path(local) / folder / name))
        self.client.set_terminated(run_id, "FINISHED" if status == "completed" else "FAILED")

    def finish_sweep(self, status: str = "FINISHED") -> None:
        if self.parent_id is not None:
            self.client.set_terminated(self.parent_id, status)

    # -- Tune callback hooks (called in the driver, one at a time) ------------------------
    def setup(self, **info):
        self.open()

    def on_trial_start(self, iteration, trials, trial, **info):
        for member in trial_members(trial.config):
            self.child_run(member)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("status") == "running" and "epoch" in result:
            for member in trial_members(trial.config):
                self.log_epoch(member, member_result(result, member))

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        status = result.get("status", "completed")
        if status == "running":
            status = "completed"
        for member in trial_members(trial.config):
            self.finish_trial(member, status, result.get("error", ""), trial.checkpoint,
                              member_folder(member))

    def on_trial_error(self, iteration, trials, trial, **info):
        for member in trial_members(trial.config):
            self.finish_trial(member, "failed", trial_error_text(trial))

    def on_trial_recover(self, iteration, trials, trial, **info):
        for member in trial_members(trial.config):
            self.flush(member["trial_id"])

    def on_experiment_end(self, trials, **info):
        self.flush()


def _param_text(value) -> str:
    return "none" if value is None else str(value)
