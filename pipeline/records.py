"""The records both halves of pipeline/ share: a trial's statuses, the columns of
results/sweep.csv, a trial's file names and the MLflow tags. Plain names, no Ray or MLflow:
the sweep (pipeline.sweep) writes them, the later stages (pipeline.results) read them, and
neither half imports the other.
"""
from __future__ import annotations

from pathlib import Path

from echo.methods import METHODS, method_options, tunable_options
from echo.metrics import EPOCH_METRICS
from echo.settings import provenance_settings


class TrialStatus:
    """A trial's status: the `status` key of every report it makes to Tune, its MLflow child
    run's `status` tag and its `status` column in results/sweep.csv (plain strings: they are
    written as they are)."""
    RUNNING = "running"          # every epoch's report; never how a trial ends
    COMPLETED = "completed"      # trained every epoch (or stopped early by ASHA)
    NONFINITE = "nonfinite"      # its loss turned NaN/inf: ended with the reason, no retry
    FAILED = "failed"            # crashed more than sweep.max_failures times
    INTERRUPTED = "interrupted"  # MLflow only: its sweep was archived before it ended


# -- a trial's files -------------------------------------------------------------------------
# The files of a trial's final Tune checkpoint (per member folder for a packed trial), also its
# MLflow child run's artifacts. The model file is echo's checkpoint dict (`echo.train.
# save_checkpoint`); among the stage's outputs it is `trial_checkpoint(trial_id, folder)`.
MODEL_FILE = "model.pt"
RECONSTRUCTIONS_FILE = "reconstructions.png"
ARTIFACT_DIR = Path("mlartifacts")     # the MLflow experiment's artifact root (state, not an out)


def trial_checkpoint(trial_id: str, folder: Path) -> Path:
    """Where a completed trial's model file goes in the stage's checkpoints folder."""
    return Path(folder) / f"{trial_id}.pt"


# -- the columns of results/sweep.csv ----------------------------------------------------------
# What a trial reports per epoch (and per member, for a packed trial), logs to MLflow and keeps
# (its last epoch's) in results/sweep.csv: the library's epoch record, echo.metrics.EPOCH_METRICS,
# defined there once. Any train_/test_ value may be the search metric, so all are in every
# report (Tune checks).
REPORTED_METRICS = EPOCH_METRICS
# The options any method lets a sweep search (e.g. Echo's clip_factor): top-level keys of a
# trial's config too, so that Tune's progress table shows them.
OPTION_COLUMNS = tuple(sorted({o for m in METHODS for o in tunable_options(m)}))
# A trial's provenance (`pipeline.sweep.trials.trial_provenance`): every training setting it
# was trained with (echo.settings.provenance_settings: all TrainConfig fields but the local
# ones), then every method's options, a trial's own with the values it used (its method's
# defaults included), the others' empty. Its MLflow child run's params are the same, its own
# options only.
PROVENANCE_SETTINGS = provenance_settings()
METHOD_OPTION_COLUMNS = tuple(sorted({o for m in METHODS for o in method_options(m)}))
# A trial's settings: the first columns of results/sweep.csv and of results/evaluation.csv.
SETTING_COLUMNS = ("trial_id", *PROVENANCE_SETTINGS, *METHOD_OPTION_COLUMNS)
OUTCOME_COLUMNS = ("status", "error", "epochs_done", "checkpoint", "mlflow_run_id")
CSV_COLUMNS = [*SETTING_COLUMNS, *OUTCOME_COLUMNS, *EPOCH_METRICS]
# Each name once: a record value named like a setting (the per-epoch lr) would overwrite the
# setting in the row, an option named like a training setting would hide it.
if len(set(CSV_COLUMNS)) != len(CSV_COLUMNS):
    raise ImportError(f"results/sweep.csv would hold a column twice: "
                      f"{sorted({c for c in CSV_COLUMNS if CSV_COLUMNS.count(c) > 1})} (a "
                      f"training setting, a method option and the epoch record share a name)")

# -- MLflow tags -------------------------------------------------------------------------------
# A sweep is one parent run (ROLE_TAG "sweep") with one child run per trial ("trial"), all
# tagged with the sweep's instance id; the child's run id is the `mlflow_run_id` column.
PARENT_TAG = "mlflow.parentRunId"
SWEEP_UID_TAG = "echo.sweep_uid"
ROLE_TAG = "echo.role"
NOTE_TAG = "mlflow.note.content"             # a run's description (markdown) in the UI
COMMIT_TAG = "mlflow.source.git.commit"
COLOR_TAG = "mlflow.runColor"
