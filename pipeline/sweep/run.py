"""The rate-distortion sweep on Ray Tune: run it, resume it, collect its results.

    run_sweep(load_params("params.yaml"), root=Path("."))   # -> results/sweep.csv

A grid over method x beta x arch x latent_dim (x seed), Optuna for the learning rate and Echo's
clipping factor at each grid point (pipeline.sweep.search), the trials in Ray workers
(pipeline.sweep.trainable), MLflow tracking from this driver (pipeline.sweep.tracking). The experiment
lives in `<storage_path>/<name>` (pipeline.sweep.experiment); if it exists with the same settings,
the sweep is resumed with `Tuner.restore(resume_errored=True)`. docs/sweep.md explains it at
length, and its "Layout of pipeline/" which module holds what.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import ray
from ray import tune
from ray.tune.experiment import Trial
from ray.tune.search import ConcurrencyLimiter

from echo.files import atomic_write
from echo.settings import resume_free_settings
from pipeline.sweep.checks import (check_inputs, check_local_gpus, check_writable,
                                   ray_cluster_address)
from pipeline.config import Params, SweepParams, is_free
from pipeline.sweep.experiment import (experiment_lock, experiment_uid, fingerprint, same_settings,
                                       signed_storage, storage_uri, stored_settings, stored_uid,
                                       verify_experiment_state)
from pipeline.mlflow_store import first_line, resolve_tracking_uri, store_unreachable
from pipeline.sweep.search import GridOptunaSearch, GridPointASHA, search_space
from pipeline.stage_files import DEFAULT_FILES, StageFiles
from pipeline.sweep.errors import SweepError, SweepFailed, SweepInterrupted  # noqa: F401
from pipeline.sweep.tracking import SweepTracker
from pipeline.sweep.trainable import train_trial, trial_base
from pipeline.records import ARTIFACT_DIR, CSV_COLUMNS, MODEL_FILE, TrialStatus, trial_checkpoint
from pipeline.sweep.trials import (csv_row, grid_points, member_folder, member_outcome,
                                   member_result, trial_error_text, trial_members)


def connect_ray(num_cpus: int | None = None) -> bool:
    """Join the cluster at $RAY_ADDRESS, else start Ray on this machine (with `num_cpus`
    logical CPUs, default all); True if this call started it. Without $RAY_ADDRESS, Ray joins
    the cluster started on this node by `ray start` / `ray up`, if any; `RAY_ADDRESS=local`
    always starts a new one (the tests set it: two test workers never join each other's)."""
    if ray.is_initialized():
        return False
    address = ray_cluster_address()
    # Local workers import `echo` / `pipeline` from this checkout; cluster nodes run the image.
    code = str(Path(__file__).resolve().parents[2])          # the checkout (pipeline/sweep/..)
    path = os.pathsep.join(p for p in (code, os.environ.get("PYTHONPATH")) if p)
    runtime_env = None if address else {"env_vars": {"PYTHONPATH": path}}
    if not address:
        # A Ray this call starts prestarts an idle worker on every CPU; the trials never use
        # them (they run in workers started with the runtime env above), and each costs ~1 CPU-s
        # to start. Ray's raylet reads these when it starts: a Ray this call joins (one started
        # by `ray start` on this node) keeps its own. They stay in this process's environment:
        # a Ray it starts later (or a `ray start` it runs) prestarts none either.
        os.environ.setdefault("RAY_enable_worker_prestart", "0")
        os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
    ray.init(address=address or os.environ.get("RAY_ADDRESS") or None,
             num_cpus=None if address else num_cpus,
             runtime_env=runtime_env, include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    return True


class _EndedTrials(tune.Callback):
    """Collects every trial at the end (also after an interruption), restored ones included."""

    def __init__(self):
        self.trials: list = []

    def on_experiment_end(self, trials, **info):
        self.trials = list(trials)

    @property
    def status(self) -> dict[str, str]:
        return {t.config["trial_id"]: t.status for t in self.trials}

    @property
    def unfinished(self) -> list:
        return [t for t in self.trials if not trial_finished(t)]


class _StopOnFullDisk(tune.Callback):
    """A trial that crashed because the disk it writes to is full would crash again on every
    retry and end `failed`: stop the sweep as Ctrl-C does instead (its trials saved; Tune's
    last intact snapshot kept), and say so in one line; the rerun, with room, resumes it."""

    def __init__(self):
        self.full = ""                        # the first such error, one line

    def _check(self, trial) -> None:
        # The driver's own copy of the error (the one in storage may not be synced yet, or
        # could not be: the disk is full).
        local = getattr(trial, "error_file", None)
        try:
            text = Path(local).read_text() if local else ""
        except OSError:
            text = ""
        text = text or str(trial.get_error() or "")
        if self.full or not _disk_full(text):
            return
        line = next(line for line in text.splitlines() if _disk_full(line))
        self.full = f"trial {trial.config.get('trial_id', trial)}: {line.strip()[:300]}"
        if signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, signal.SIG_IGN, None):
            os.kill(os.getpid(), signal.SIGUSR1)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._check(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._check(trial)


def _disk_full(text: str) -> bool:
    return "No space left on device" in text or "Errno 28" in text or "errno 28" in text


class _QuietFullDiskSnapshots(logging.Filter):
    """Tune logs a failed experiment snapshot as a full traceback; when the disk is full the
    sweep says so itself, in one line (its previous snapshot is intact: state files are
    written whole or not at all)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and _disk_full(str(record.exc_info[1])):
            return False
        return not _disk_full(record.getMessage())


def trial_finished(trial) -> bool:
    """Ended for good: crashed past its retries (ERROR), or its trainable returned or the
    scheduler (ASHA) stopped it (TERMINATED with Tune's `done` in its last result). A sweep
    that is interrupted (Ctrl-C, SIGUSR1, a store outage) has Tune stop its running trials as
    TERMINATED too, but not done: they did not reach their last epoch, and the rerun resumes
    them from their checkpoints (Tune's last snapshot, taken before it stopped them, holds
    them as running)."""
    if trial.status == Trial.ERROR:
        return True
    return trial.status == Trial.TERMINATED and bool((trial.last_result or {}).get("done"))



def run_sweep(params: Params, root: Path | str = ".", *, files: StageFiles = DEFAULT_FILES,
              callbacks: tuple = (), verbose: int = 1):
    """Run (or resume) the sweep; write `files.sweep_csv` (results/sweep.csv) and
    `files.checkpoints`/<trial>.pt under `root`, and return the table (a pandas DataFrame).
    Raises SweepInterrupted if trials remain unfinished."""
    root = Path(root).resolve()
    check_inputs(params, root, files)
    sweep = params.sweep
    storage = storage_uri(params, root)
    experiment = f"{storage}/{sweep.name}"
    if not ray.is_initialized() and not ray_cluster_address():
        check_local_gpus(params)            # before Ray starts: seconds, not a hang
    with experiment_lock(storage, sweep.name):
        check_writable(params, root, files)
        started = False
        try:
            previous = stored_uid(experiment)
            settings = fingerprint(params, root)
            if same_settings(stored_settings(experiment), settings):
                # To be resumed: Tune's state there is verified before anything starts
                # (Tune would unpickle it; the folder may be shared).
                verify_experiment_state(experiment)
            uid, resumable = experiment_uid(experiment, settings)
            tracker = SweepTracker(
                resolve_tracking_uri(params.tracking.uri, root), params.tracking.experiment,
                sweep.name, uid, artifact_root=root / ARTIFACT_DIR,
                parent_params={"dataset": params.data.dataset, "epochs": params.train.epochs,
                               "methods": ",".join(sweep.methods),
                               "betas": ",".join(f"{b:g}" for b in sweep.betas),
                               "archs": ",".join(sweep.archs),
                               "latent_dims": ",".join(map(str, sweep.latent_dims)),
                               "num_samples": sweep.search.num_samples}).open()
            if previous is not None and previous != uid:
                # The params changed and the old experiment was archived: its runs still open
                # (a killed or interrupted driver) will never be resumed; close them.
                tracker.runs.close_sweep(previous)
            started = connect_ray()
            return _fit_and_collect(params, root, files, experiment, storage, resumable,
                                    tracker, callbacks, verbose)
        except Exception as err:
            if isinstance(err, SweepError) or not store_unreachable(err):
                raise
            # At start-up or while writing the results: one line, and the rerun resumes.
            raise SweepInterrupted(
                f"tracking.uri {params.tracking.uri}: the store is unreachable "
                f"({first_line(err)}); start it (or fix tracking.uri) "
                f"and run the stage again: the sweep resumes where it stopped") from None
        finally:
            if started:
                ray.shutdown()


def _fit_and_collect(params: Params, root: Path, files: StageFiles, experiment: str, storage: str,
                     resumable: bool, tracker, callbacks: tuple, verbose: int):
    sweep = params.sweep
    statuses, disk = _EndedTrials(), _StopOnFullDisk()
    all_callbacks = [tracker, statuses, disk, *callbacks]
    trainable = tune.with_resources(train_trial, {"cpu": sweep.resources.cpu,
                                                  "gpu": sweep.resources.gpu})
    # Tune's state files in the experiment folder are signed when written and verified
    # before they are unpickled (pipeline.sweep.experiment: the folder may be shared).
    fs, fs_storage = signed_storage(storage, sweep.name)
    fs_experiment = f"{fs_storage.rstrip('/')}/{sweep.name}"
    if resumable and tune.Tuner.can_restore(fs_experiment, storage_filesystem=fs):
        verify_experiment_state(experiment)     # again: the folder may have changed since
        tuner = tune.Tuner.restore(fs_experiment, trainable, resume_errored=True,
                                   storage_filesystem=fs)
        # The run config (callbacks included) is restored from the pickled first run; use
        # this run's callbacks, with the tracker connected to the current store, and this
        # run's max_concurrent / max_failures / checkpointing (docs/sweep.md: they may change).
        apply_resume_knobs(tuner, params, root, all_callbacks)
    else:
        run_config = tune.RunConfig(
            name=sweep.name, storage_path=fs_storage, storage_filesystem=fs, verbose=verbose,
            callbacks=all_callbacks,
            failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
            # Tune snapshots its state whenever a trial has saved num_to_keep checkpoints:
            # 4 keeps that rare.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=4))
        tuner = tune.Tuner(trainable, tune_config=tune_config(params, root),
                           run_config=run_config)
    quiet = _QuietFullDiskSnapshots()
    tune_loggers = [logging.getLogger(name) for name in ("ray.tune", "ray.tune.tune",
                                                         "ray.tune.execution.tune_controller",
                                                         "ray.train._internal.storage",
                                                         "ray.train._internal.syncer",
                                                         "ray.tune.execution.experiment_state")]
    for logger in tune_loggers:
        logger.addFilter(quiet)
    try:
        tuner.fit()
    finally:
        for logger in tune_loggers:
            logger.removeFilter(quiet)
    # Results a store outage held back are written first (waiting while it may come back).
    queue, runs = tracker.queue, tracker.runs
    if queue.unreachable or not queue.drain(wait=queue.max_outage):
        raise SweepInterrupted(
            f"{queue.unreachable or 'tracking store unreachable'}; the sweep stopped with its "
            f"trials saved: run the stage again when the store is back to resume it")
    if disk.full:
        runs.close_sweep(runs.sweep_uid)
        raise SweepInterrupted(
            f"sweep.storage_path {storage}: no space left on device ({disk.full}); free space "
            f"there and run the stage again: the sweep resumes from its checkpoints in "
            f"{experiment}")
    expected = len(grid_points(params)) * sweep.search.num_samples
    missing = expected - len(statuses.status) + len(statuses.unfinished)
    if missing:
        # The parent run and the child runs of the trials that did not finish end KILLED
        # (status tag `interrupted`); a rerun reopens them.
        runs.close_sweep(runs.sweep_uid)
        raise SweepInterrupted(
            f"sweep {sweep.name!r} was interrupted with {missing} of {expected} trials "
            f"unfinished (nothing written to {files.sweep_csv}); run the stage again to resume "
            f"them from their checkpoints in {experiment}")
    ended = {id(t): trial_outcome(t) for t in statuses.trials}
    if not any(status == TrialStatus.COMPLETED for status, _ in ended.values()):
        # Nothing to evaluate: exit non-zero (DVC records nothing) instead of an empty table
        # that evaluate and frontier would accept. The child runs are closed with their reason.
        for trial in statuses.trials:
            status, error = ended[id(trial)]
            for config in trial_members(trial.config):
                runs.finish_trial(config, status, error)
        runs.finish_sweep("FAILED")
        counts = {}
        for status, _ in ended.values():
            counts[status] = counts.get(status, 0) + 1
        first = next((error for _, error in ended.values() if error), "")
        raise SweepFailed(
            f"sweep {sweep.name!r}: no trial completed "
            f"({', '.join(f'{n} {s}' for s, n in sorted(counts.items()))}"
            f"{f'; first error: {first}' if first else ''}); nothing written to {files.sweep_csv}; "
            f"fix the cause and run the stage again (failed trials are retried, changed params "
            f"start a new sweep)")
    try:
        table = collect_results(statuses.trials, runs, root, files)
    except OSError as err:
        runs.finish_sweep("FAILED")
        folder = (root / files.sweep_csv).parent
        raise SweepError(f"cannot write the sweep's results under {folder} "
                         f"({err.strerror or err}); make room or make it writable and run the "
                         f"stage again: the trained trials are kept and are not retrained") from None
    runs.finish_sweep("FINISHED")
    return table


class _RunLimiter(ConcurrencyLimiter):
    """Tune's ConcurrencyLimiter, but its limit is this run's `sweep.max_concurrent`: a
    restored experiment would put back the limit it was saved with."""

    def set_state(self, state: dict) -> None:
        limit = self.max_concurrent
        super().set_state(state)
        self.max_concurrent = limit


# Tune restores a wrapper's state under its class name: keep the saved limiter's.
_RunLimiter.__name__ = "ConcurrencyLimiter"


class _ResumeKnobs(tune.Callback):
    """Applies this run's settings that may change between runs (docs/sweep.md) to a restored
    experiment, whose trials and searcher keep the values they were saved with: every trial's
    retry budget; the settings (`knobs`: checkpointing, device, CUDA graphs) and resources of
    trials not running yet (pending, paused, to be retried) and of those the searcher creates."""

    def __init__(self, searcher, max_failures: int, knobs: dict, resources: dict):
        self.searcher, self.max_failures, self.knobs = searcher, max_failures, knobs
        self.resources = resources

    def on_step_begin(self, iteration, trials, **info):
        self.searcher.base.update(self.knobs)              # trials it has yet to create
        for trial in trials:
            trial.max_failures = self.max_failures
            if trial.status in (Trial.PENDING, Trial.PAUSED, Trial.ERROR):
                trial.config.update(self.knobs)
                if trial.placement_group_factory.required_resources != self.resources:
                    trial.update_resources(tune.PlacementGroupFactory([self.resources]))


def apply_resume_knobs(tuner, params: Params, root: Path, callbacks: list) -> None:
    """This run's callbacks and resume knobs on a restored Tuner (Ray's internals: the
    restored run and tune configs are the pickled ones of the first run)."""
    sweep = params.sweep
    local = tuner._local_tuner
    run_config = local.get_run_config()
    run_config.failure_config = tune.FailureConfig(max_failures=sweep.max_failures)
    tune_cfg = local._tune_config
    searcher = tune_cfg.search_alg
    base = trial_base(params, root)
    resources = {"CPU": sweep.resources.cpu, "GPU": sweep.resources.gpu}
    # The trial settings declared free to change on resume (echo.settings `resume_free`,
    # pipeline.config `free`: device, CUDA graphs, data paths, checkpointing) take this run's.
    free = {*resume_free_settings(),
            *(name for name, info in SweepParams.model_fields.items() if is_free(info))}
    run_config.callbacks = [*callbacks, _ResumeKnobs(
        searcher, sweep.max_failures, {k: v for k, v in base.items() if k in free},
        {k: v for k, v in resources.items() if v})]
    if not isinstance(searcher, ConcurrencyLimiter):
        tune_cfg.search_alg = _RunLimiter(searcher, max_concurrent=sweep.max_concurrent)
        tune_cfg.max_concurrent_trials = None


def trial_outcome(trial) -> tuple[str, str]:
    """(status, error) of an ended Tune trial: completed, nonfinite or failed."""
    if trial.status == Trial.ERROR:
        return TrialStatus.FAILED, trial_error_text(trial)
    if (trial.last_result or {}).get("status") == TrialStatus.NONFINITE:
        return TrialStatus.NONFINITE, trial.last_result.get("error", "")
    return TrialStatus.COMPLETED, ""


def tune_config(params: Params, root: Path) -> tune.TuneConfig:
    sweep = params.sweep
    points = grid_points(params)
    searcher = GridOptunaSearch(points, [search_space(params, p["method"]) for p in points],
                                trial_base(params, root), sweep.search.num_samples,
                                metric=sweep.search.metric, mode="min", seed=params.sweep.seeds[0])
    scheduler = None
    if sweep.asha:
        scheduler = GridPointASHA(metric=sweep.search.metric, mode="min",
                                  max_t=params.train.epochs,
                                  grace_period=max(1, params.train.epochs // 4))
    return tune.TuneConfig(search_alg=searcher, scheduler=scheduler,
                           num_samples=searcher.total, max_concurrent_trials=sweep.max_concurrent,
                           trial_name_creator=_trial_id, trial_dirname_creator=_trial_id,
                           # one worker process trains trial after trial: no re-import of torch
                           reuse_actors=True)


def _trial_id(trial) -> str:
    return trial.config["trial_id"]


def collect_results(trials, runs, root: Path, files: StageFiles = DEFAULT_FILES):
    """One row per trial (Tune's `Trial`s; per beta for packed trials); completed trials' final
    checkpoints copied to `files.checkpoints`, the table written to `files.sweep_csv`."""
    import pandas as pd
    # staged beside its target, so that swapping it into place is one rename
    target = root / files.checkpoints
    staging = Path(tempfile.mkdtemp(prefix=".checkpoints-", dir=_ensure(target.parent)))
    rows = []
    try:
        for trial in trials:
            members = trial_members(trial.config)
            results = [member_result(trial.last_result or {}, config) for config in members]
            outcomes = [member_outcome(*trial_outcome(trial), metrics) for metrics in results]
            completed = [status == TrialStatus.COMPLETED and trial.checkpoint is not None
                         for status, _ in outcomes]
            if any(completed):     # one download of the trial's checkpoint for all its members
                with trial.checkpoint.as_directory() as folder:
                    for config, copy in zip(members, completed):
                        if copy:
                            shutil.copyfile(Path(folder) / member_folder(config) / MODEL_FILE,
                                            trial_checkpoint(config["trial_id"], staging))
            for config, metrics, (status, error), copied in zip(members, results, outcomes,
                                                                 completed):
                checkpoint = trial_checkpoint(config["trial_id"], files.checkpoints).as_posix() \
                    if copied else ""
                # Finishes the MLflow child of a trial that ended in an earlier, interrupted run.
                runs.finish_trial(config, status, error,
                                     trial.checkpoint if status == TrialStatus.COMPLETED else None,
                                     member_folder(config))
                rows.append(csv_row(config, metrics, status, error, checkpoint))
        child_runs = runs.child_runs()
        for row in rows:
            row["mlflow_run_id"] = child_runs.get(row["trial_id"], "")
        table = pd.DataFrame(rows, columns=CSV_COLUMNS).sort_values("trial_id", ignore_index=True)
        _replace_dir(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    out = root / files.sweep_csv
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: table.to_csv(tmp, index=False))
    return table


def _replace_dir(new: Path, target: Path) -> None:
    """Swap a fully written folder into place (the old one is removed only afterwards)."""
    old = target.with_name(f".{target.name}-old-{int(time.time() * 1000)}")
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
