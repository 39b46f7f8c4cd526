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
import os
import signal
import sys
import time
from typing import Callable
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from ray import tune

from pipeline.colors import method_color
from pipeline.results_tracking import (COLOR_TAG, COMMIT_TAG, PARENT_TAG, SWEEP_UID_TAG,
                                       git_commit)
from pipeline.trials import (EPOCH_METRICS, MODEL_FILE, RECONSTRUCTIONS_FILE, TrialStatus,
                             member_folder, member_outcome, member_result, trial_error_text,
                             trial_members, trial_provenance, PROVENANCE_SETTINGS)

# A child run's params are its provenance: these training settings, then its method's options.
TRIAL_SETTINGS = PROVENANCE_SETTINGS
PARENT_PREFIX = "sweep."      # the parent's params (sweep.betas), never mistaken for a trial's
ROLE_TAG = "echo.role"
# How long a sweep goes on while its tracking store is unreachable (env
# ECHO_TRACKING_MAX_OUTAGE_S), and how often the store is tried meanwhile.
MAX_OUTAGE_SECONDS = 600.0
RETRY_SECONDS = 5.0


@contextlib.contextmanager
def store_lock(uri: str):
    """Serialise the first use of a SQLite store among drivers on this machine: two drivers
    creating the schema of a new mlflow.db at once fail (`_alembic_tmp_experiments already
    exists`). Other stores need no lock here."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        yield
        return
    import hashlib
    import tempfile
    from filelock import FileLock
    db = Path(uri[len(prefix):].split("?", 1)[0]).resolve()
    db.parent.mkdir(parents=True, exist_ok=True)
    # In the temp folder (one per store path): beside mlflow.db it would be a stray file in
    # the project, which git does not ignore.
    digest = hashlib.sha256(str(db).encode()).hexdigest()[:16]
    with FileLock(str(Path(tempfile.gettempdir()) / f"echo-rd-store-{digest}.lock"),
                  timeout=600):
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
        self._queue: list[Callable[[], None]] = []  # hook writes waiting for the store
        self._down_since: float | None = None     # time.monotonic() it became unreachable
        self._tried = 0.0
        self._last_error = ""
        self.max_outage = float(os.environ.get("ECHO_TRACKING_MAX_OUTAGE_S", MAX_OUTAGE_SECONDS))
        self.unreachable = ""                     # why the sweep was stopped, if it was

    def __getstate__(self):
        # Tune pickles its callbacks with the experiment; a connection is not state.
        return {**self.__dict__, "client": None, "_children": {}, "_last_step": {},
                "_pending": {}, "_flushed": {}, "_queue": [], "_down_since": None}

    # -- runs ------------------------------------------------------------------------------
    def open(self) -> "SweepTracker":
        """Connect, and find or create the experiment and this sweep's parent run."""
        if self.client is not None:
            return self
        if self.uri.startswith(("http://", "https://")):
            # Fail a call in seconds, not after MLflow's ~4 minutes of retries per call: the
            # tracker waits for a store that is away itself, without blocking the trials.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
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

    # -- a store that goes away ------------------------------------------------------------
    # Every hook's MLflow calls go through `_defer`: while the store is unreachable they wait,
    # in order, in `_queue`, and Tune's loop (so every trial) goes on; they are written when it
    # is back. Past `max_outage` seconds the sweep is stopped as Ctrl-C would stop it (its
    # trials saved, a rerun resumes) and `unreachable` says why.
    def _defer(self, op: Callable[[], None]) -> None:
        self._queue.append(op)
        self.drain()

    def drain(self, wait: float = 0.0) -> bool:
        """Write what is buffered, in order (while the store is away, try at most every
        RETRY_SECONDS); keep trying for `wait` seconds. True when nothing is left."""
        deadline = time.monotonic() + wait
        while True:
            if self._down_since is None or \
                    time.monotonic() - self._tried >= RETRY_SECONDS:
                if self._write_queue():
                    return True
            self._check_outage()
            if self.unreachable or time.monotonic() >= deadline:
                return False
            time.sleep(max(0.0, min(RETRY_SECONDS, deadline - time.monotonic())))

    def _write_queue(self) -> bool:
        while self._queue:
            try:
                self._queue[0]()
            except Exception as err:  # noqa: BLE001 - only an unreachable store is absorbed
                if not store_unreachable(err):
                    raise
                self._tried = time.monotonic()
                self._last_error = _first_line(err)
                if self._down_since is None:
                    self._down_since = self._tried
                    print(f"warning: tracking store {self.uri} is unreachable "
                          f"({self._last_error}); the trials go on and their results are "
                          f"written when it is back (waiting at most {self.max_outage:.0f} s)",
                          file=sys.stderr, flush=True)
                return False
            self._queue.pop(0)
        if self._down_since is not None:
            print(f"note: tracking store {self.uri} is back after "
                  f"{time.monotonic() - self._down_since:.0f} s; buffered results written",
                  file=sys.stderr, flush=True)
            self._down_since = None
        return True

    def _check_outage(self) -> None:
        if self._down_since is None or self.unreachable:
            return
        away = time.monotonic() - self._down_since
        if away <= self.max_outage:
            return
        self.unreachable = (f"tracking store {self.uri} unreachable for {away:.0f} s "
                            f"({self._last_error})")
        # Inside Tune's run, stop it as Ctrl-C does (trials saved, the rerun resumes); Tune's
        # handler is installed only then (the default action would kill the process).
        if signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, signal.SIG_IGN, None):
            os.kill(os.getpid(), signal.SIGUSR1)

    # -- Tune callback hooks (called in the driver, one at a time) ------------------------
    def setup(self, **info):
        self.open()

    def on_trial_start(self, iteration, trials, trial, **info):
        members = trial_members(trial.config)
        self._defer(lambda: [self.child_run(member) for member in members])

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("status") == TrialStatus.RUNNING and "epoch" in result:
            # a packed trial's member that has stopped (non-finite loss) logs no more epochs
            members = [(m, r) for m in trial_members(trial.config)
                       if (r := member_result(result, m)).get("status") == TrialStatus.RUNNING]
            self._defer(lambda: [self.log_epoch(m, r) for m, r in members])

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        status = result.get("status", TrialStatus.COMPLETED)
        if status == TrialStatus.RUNNING:
            status = TrialStatus.COMPLETED
        members, checkpoint = trial_members(trial.config), trial.checkpoint
        outcomes = [member_outcome(status, result.get("error", ""), member_result(result, m))
                    for m in members]
        self._defer(lambda: [self.finish_trial(member, member_status, error, checkpoint,
                                               member_folder(member))
                             for member, (member_status, error) in zip(members, outcomes)])

    def on_trial_error(self, iteration, trials, trial, **info):
        members, error = trial_members(trial.config), trial_error_text(trial)
        self._defer(lambda: [self.finish_trial(member, TrialStatus.FAILED, error)
                             for member in members])

    def on_trial_recover(self, iteration, trials, trial, **info):
        members = trial_members(trial.config)
        self._defer(lambda: [self.flush(member["trial_id"]) for member in members])

    def on_experiment_end(self, trials, **info):
        self._defer(self.flush)


def store_unreachable(err: BaseException) -> bool:
    """The store did not answer (refused, timed out, a 5xx): worth waiting for, unlike a
    refused request."""
    import requests
    from mlflow.exceptions import MlflowException
    if isinstance(err, (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                        ConnectionError, TimeoutError)):
        return True
    text = str(err)
    return isinstance(err, MlflowException) and (
        "API request to" in text or "Max retries exceeded" in text
        or "Connection refused" in text)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    line = text[0] if text else type(err).__name__
    return line if len(line) <= 200 else line[:197] + "..."


def trial_params(config: dict) -> dict:
    """A trial's params: its provenance (`pipeline.trials.trial_provenance`, the setting
    columns of its results/sweep.csv row): every training setting it used, defaults included,
    and its own method's options, each once."""
    return trial_provenance(config)


def _param_text(value) -> str:
    return "none" if value is None else str(value)
