"""A sweep's runs in MLflow: one parent run per sweep, one child run per (per-beta) trial, found
again rather than re-created when a sweep resumes: the parent by the sweep's instance id (tag
`echo.sweep_uid`, written once per experiment directory), a child by the trial's readable id
(tag `trial_id`). Epochs a child already holds are not logged twice.

Only the driver calls this (pipeline.sweep.tracking, a Tune callback): it is the single writer
of the store, so any number of concurrent trials share a SQLite store without "database is
locked". Calls fail at once when the store is away; pipeline.sweep.outage holds them back.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from pipeline.colors import method_color
from pipeline.mlflow_store import SWEEP_DRIVER_HTTP, git_commit, is_server, store_lock
from pipeline.records import (COLOR_TAG, COMMIT_TAG, MODEL_FILE, PARENT_TAG,
                              RECONSTRUCTIONS_FILE, ROLE_TAG, SWEEP_UID_TAG, TrialStatus)
from echo.metrics import EPOCH_METRICS
from pipeline.sweep.trials import trial_provenance

if TYPE_CHECKING:
    from ray import tune

PARENT_PREFIX = "sweep."      # the parent's params (sweep.betas), never mistaken for a trial's


class SweepRuns:
    """The parent and child runs of one sweep, and the epochs logged into them."""

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

    def open(self) -> "SweepRuns":
        """Connect, and find or create the experiment and this sweep's parent run."""
        if self.client is not None:
            return self
        if is_server(self.uri):
            SWEEP_DRIVER_HTTP.install()
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
                tags={SWEEP_UID_TAG: self.sweep_uid, ROLE_TAG: "sweep", "sweep": self.sweep_name,
                      **self._source_tags()})
            self.parent_id = run.info.run_id
            self.client.log_batch(self.parent_id, params=[
                Param(PARENT_PREFIX + k, _param_text(v)) for k, v in self.parent_params.items()])
        return self

    def _source_tags(self) -> dict[str, str]:
        """The commit of the code that runs the sweep, where it is a git checkout."""
        if not hasattr(self, "_commit"):
            self._commit = git_commit()
        return {COMMIT_TAG: self._commit} if self._commit else {}

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
                    run.data.tags.get("status") == TrialStatus.RUNNING:
                self.client.set_tag(run.info.run_id, "status", TrialStatus.INTERRUPTED)
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
            if existing[0].data.tags.get("status") == TrialStatus.INTERRUPTED:
                self.client.set_tag(run_id, "status", TrialStatus.RUNNING)    # resumed
        else:
            run_id = self.client.create_run(
                self.experiment_id, run_name=trial_id,
                tags={PARENT_TAG: self.parent_id, SWEEP_UID_TAG: self.sweep_uid,
                      ROLE_TAG: "trial", "trial_id": trial_id, "method": config["method"],
                      "dataset": config["dataset"], "beta": _param_text(config["beta"]),
                      "seed": _param_text(config.get("seed")),
                      "status": TrialStatus.RUNNING, COLOR_TAG: method_color(config["method"]),
                      **self._source_tags()}).info.run_id
            self.client.log_batch(run_id, params=[
                Param(k, _param_text(v)) for k, v in trial_params(config).items()])
            self._last_step[trial_id] = 0
        self._children[trial_id] = run_id
        return run_id

    def log_epoch(self, config: dict, result: dict) -> None:
        """The epoch record's values (EPOCH_METRICS) with step = epoch, each epoch at most
        once."""
        trial_id = config["trial_id"]
        self.child_run(config)           # created (or found) the first time
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
            pending = self._pending.get(key, [])
            while pending:                 # removed only once written: a failed write is retried
                self.client.log_batch(self._children[key], metrics=pending[:1000])  # batch limit
                del pending[:1000]
            self._pending.pop(key, None)
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
        if checkpoint is not None and status == TrialStatus.COMPLETED:
            with checkpoint.as_directory() as local:
                if (Path(local) / folder / MODEL_FILE).exists():
                    self.complete_history(run_id, Path(local) / folder / MODEL_FILE)
                for name in (MODEL_FILE, RECONSTRUCTIONS_FILE):
                    if (Path(local) / folder / name).exists():
                        self.client.log_artifact(run_id, str(Path(local) / folder / name))
        self.client.set_terminated(run_id, "FINISHED" if status == TrialStatus.COMPLETED
                                   else "FAILED")

    def complete_history(self, run_id: str, model_path: Path) -> int:
        """Log the epochs of the final checkpoint's per-epoch history that the run lacks: a
        finished trial's child run is complete however it came to be (re)created, e.g. by a
        resume against a new or lost store, where Tune replays nothing of a finished trial
        and a resumed one only from its checkpoint on. Returns how many epochs it logged."""
        from echo.train import load_checkpoint
        history = load_checkpoint(model_path).get("history", [])
        logged = {m.step for m in self.client.get_metric_history(run_id, "test_neg_elbo")}
        now_ms = int(time.time() * 1000)
        missing = [(int(entry.get("epoch", i + 1)), entry) for i, entry in enumerate(history)]
        missing = [(step, entry) for step, entry in missing if step not in logged]
        metrics = [Metric(k, float(entry[k]), now_ms, step) for step, entry in missing
                   for k in EPOCH_METRICS if k in entry and math.isfinite(entry[k])]
        for start in range(0, len(metrics), 1000):          # MLflow's batch limit
            self.client.log_batch(run_id, metrics=metrics[start:start + 1000])
        return len(missing)

    def finish_sweep(self, status: str = "FINISHED") -> None:
        if self.parent_id is not None:
            self.client.set_terminated(self.parent_id, status)


def trial_params(config: dict) -> dict:
    """A trial's params: its provenance (`pipeline.sweep.trials.trial_provenance`, the setting
    columns of its results/sweep.csv row): every training setting it used, defaults included,
    and its own method's options, each once."""
    return trial_provenance(config)


def _param_text(value) -> str:
    return "none" if value is None else str(value)
