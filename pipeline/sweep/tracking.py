"""MLflow tracking of a sweep from the Ray Tune driver: a thin Tune `Callback` that turns Tune's
hooks into writes of the sweep's runs (pipeline.sweep.runs), each through the outage queue
(pipeline.sweep.outage), so a store that goes away holds back the writes, not the trials.

Every MLflow call happens in the driver, never in the trials: the trials only report results
to Tune. A packed Tune trial (`sweep.pack_betas`: all betas in one ensemble) gets one child run
per beta, the same as unpacked trials: every hook goes through `trial_members`.
"""
from __future__ import annotations

from pathlib import Path

from ray import tune

from pipeline.records import TrialStatus
from pipeline.sweep.outage import OutageQueue
from pipeline.sweep.runs import SweepRuns
from pipeline.sweep.trials import (member_folder, member_outcome, member_result,
                                   trial_error_text, trial_members)


class SweepTracker(tune.Callback):
    """Ray Tune callback that mirrors a sweep into MLflow from the driver: `runs` are the
    sweep's MLflow runs, `queue` the writes waiting for a store that is away."""

    def __init__(self, uri: str, experiment: str, sweep_name: str, sweep_uid: str, *,
                 artifact_root: Path, parent_params: dict | None = None,
                 flush_seconds: float = 10.0):
        self.runs = SweepRuns(uri, experiment, sweep_name, sweep_uid,
                              artifact_root=artifact_root, parent_params=parent_params,
                              flush_seconds=flush_seconds)
        self.queue = OutageQueue(uri)

    def open(self) -> "SweepTracker":
        self.runs.open()
        return self

    def setup(self, **info):
        self.runs.open()

    def on_trial_start(self, iteration, trials, trial, **info):
        members = trial_members(trial.config)
        self.queue.submit(lambda: [self.runs.child_run(member) for member in members])

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("status") == TrialStatus.RUNNING and "epoch" in result:
            # a packed trial's member that has stopped (non-finite loss) logs no more epochs
            members = [(m, r) for m in trial_members(trial.config)
                       if (r := member_result(result, m)).get("status") == TrialStatus.RUNNING]
            self.queue.submit(lambda: [self.runs.log_epoch(m, r) for m, r in members])

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        status = result.get("status", TrialStatus.COMPLETED)
        if status == TrialStatus.RUNNING:
            status = TrialStatus.COMPLETED
        members, checkpoint = trial_members(trial.config), trial.checkpoint
        outcomes = [member_outcome(status, result.get("error", ""), member_result(result, m))
                    for m in members]
        self.queue.submit(lambda: [
            self.runs.finish_trial(member, member_status, error, checkpoint, member_folder(member))
            for member, (member_status, error) in zip(members, outcomes)])

    def on_trial_error(self, iteration, trials, trial, **info):
        members, error = trial_members(trial.config), trial_error_text(trial)
        self.queue.submit(lambda: [self.runs.finish_trial(member, TrialStatus.FAILED, error)
                                   for member in members])

    def on_trial_recover(self, iteration, trials, trial, **info):
        members = trial_members(trial.config)
        self.queue.submit(lambda: [self.runs.flush(member["trial_id"]) for member in members])

    def on_experiment_end(self, trials, **info):
        self.queue.submit(self.runs.flush)
