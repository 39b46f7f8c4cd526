"""MLflow view of a sweep's results: the evaluate and frontier stages' numbers and files.

After the sweep (pipeline.tracking), every trial has a child run with per-epoch metrics. This
module adds what the later stages compute, so that the MLflow UI shows the sweep's result:

- evaluate: into each trial's child run the final test metrics `final_test_rate`,
  `final_test_distortion`, `final_test_neg_elbo`, `final_test_iwae_neg_log_lik`, `iwae_k` (the
  last two only where the method has an IWAE bound) and the tag `rate_kind`; and into the
  sweep's parent run the artifacts evaluation.csv, comparison.csv and metrics.json;
- frontier: into the parent run frontier.csv, rd_curves.png, reconstructions.png, table.md.

The child run of a trial is the `mlflow_run_id` column of results/sweep.csv; the parent is that
run's `mlflow.parentRunId` tag. Re-running a stage adds nothing that is already there: a final
metric whose latest value is the same is not logged again (a changed value is appended one
step later, so the UI shows the newest), and an artifact is overwritten under its name.

The files are the results; MLflow is a view of them. So a store that cannot be reached (or
holds no such runs) never fails a stage whose files are written: `publish` prints one warning
line and returns, and `python -m pipeline.results_tracking` logs the existing files later.

Deliberately independent of pipeline.tracking, which imports Ray Tune (seconds, and the sweep's
code as DVC deps of evaluate/frontier); `resolve_tracking_uri` below is the same rule.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from pathlib import Path

import pandas as pd

from pipeline.cli import EXIT_FAILED, EXIT_OK, entry_point, error
from pipeline.config import Params
from pipeline.stage_files import DEFAULT_FILES, WRITES, StageFiles, stage_file_names
from pipeline.trials import TrialStatus

# evaluation.csv column -> final metric of the child run; prefixed so that they never mix with
# the per-epoch `test_*` history the sweep logs (step = epoch).
FINAL_METRICS = (("rate", "final_test_rate"), ("distortion", "final_test_distortion"),
                 ("neg_elbo", "final_test_neg_elbo"),
                 ("iwae_neg_log_lik", "final_test_iwae_neg_log_lik"), ("iwae_k", "iwae_k"))
FINAL_TAGS = ("rate_kind",)
PARENT_TAG = "mlflow.parentRunId"
PUBLISHED = ("evaluate", "frontier")      # the stages whose results go to MLflow


def stage_artifacts(stage: str, files: StageFiles = DEFAULT_FILES) -> tuple[str, ...]:
    """The files of `stage` that go to the sweep's parent run: all it writes."""
    return tuple(getattr(files, name).as_posix() for name in WRITES[stage])


EVALUATE_ARTIFACTS = stage_artifacts("evaluate")     # at their default places
FRONTIER_ARTIFACTS = stage_artifacts("frontier")
# A tracking server that is down: fail after seconds, not after MLflow's default 7 retries
# with exponential backoff (minutes), unless the user set these themselves.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}


class TrackingUnavailable(RuntimeError):
    """The store cannot be used for these results; the message says why."""


def resolve_tracking_uri(uri: str, root: Path) -> str:
    """A relative SQLite URI (`sqlite:///mlflow.db`) is taken relative to the project root, so
    the store does not depend on the directory a stage happens to run in (the sweep creates the
    store by this rule, evaluate and frontier find it by it)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str((root / uri[len(prefix):]).resolve())
    return uri


@contextlib.contextmanager
def _short_http_retries():
    saved = {k: os.environ.get(k) for k in HTTP_DEFAULTS}
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)


def _client(uri: str):
    prefix = "sqlite:///"
    if uri.startswith(prefix):
        db = Path(uri[len(prefix):].split("?", 1)[0])
        if not db.exists():
            # Opening it would create an empty store that holds none of the sweep's runs.
            raise TrackingUnavailable(f"{db}: no such MLflow store (the sweep stage creates it)")
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri=uri)


def _run_ids(sweep: pd.DataFrame) -> dict[str, str]:
    """trial_id -> child run id of the trials the sweep tracked."""
    if "mlflow_run_id" not in sweep.columns:
        return {}
    ids = sweep.set_index("trial_id")["mlflow_run_id"]
    return {t: str(r) for t, r in ids.items() if isinstance(r, str) and r.strip()}


def _existing_runs(client, run_ids) -> dict[str, object]:
    """run id -> Run, for the ids the store holds."""
    from mlflow.exceptions import MlflowException
    found = {}
    for run_id in dict.fromkeys(run_ids):
        try:
            found[run_id] = client.get_run(run_id)
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
    return found


def log_final_metrics(client, evaluation: pd.DataFrame, sweep: pd.DataFrame) -> tuple[int, int]:
    """Each evaluated trial's final test numbers into its child run, each value once.
    Returns (child runs that hold them now, trials whose child run is missing)."""
    from mlflow.entities import Metric, RunTag
    ids = _run_ids(sweep)
    rows = [r for _, r in evaluation.iterrows()
            if r.get("status") == TrialStatus.COMPLETED and math.isfinite(float(r["neg_elbo"]))]
    runs = _existing_runs(client, [ids[r["trial_id"]] for r in rows if r["trial_id"] in ids])
    logged = missing = 0
    now = int(time.time() * 1000)
    for row in rows:
        run = runs.get(ids.get(row["trial_id"], ""))
        if run is None:
            missing += 1
            continue
        run_id, latest = run.info.run_id, run.data.metrics
        metrics = []
        for column, name in FINAL_METRICS:
            value = float(row[column]) if pd.notna(row[column]) else math.nan
            if not math.isfinite(value):
                continue
            if name in latest:
                if math.isclose(latest[name], value, rel_tol=1e-12, abs_tol=0.0):
                    continue                        # a re-run with the same result
                # A different result (e.g. other evaluate params): append it as the newest.
                step = max(m.step for m in client.get_metric_history(run_id, name)) + 1
            else:
                step = 0
            metrics.append(Metric(name, value, now, step))
        tags = [RunTag(name, str(row[name])) for name in FINAL_TAGS
                if pd.notna(row.get(name)) and run.data.tags.get(name) != str(row[name])]
        if metrics or tags:
            client.log_batch(run_id, metrics=metrics, tags=tags)
        logged += 1
    return logged, missing


def parent_runs(client, sweep: pd.DataFrame) -> list[str]:
    """The sweep's parent run(s): the parents of the child runs in results/sweep.csv."""
    runs = _existing_runs(client, _run_ids(sweep).values())
    return list(dict.fromkeys(r.data.tags[PARENT_TAG] for r in runs.values()
                              if PARENT_TAG in r.data.tags))


def log_parent_artifacts(client, parents: list[str], files, root: Path) -> list[str]:
    """Copy `files` (paths relative to root; missing ones skipped) to the root of each parent
    run's artifacts, replacing an earlier copy of the same name. Returns the names logged."""
    present = [root / f for f in files if (root / f).is_file()]
    for parent in parents:
        for path in present:
            client.log_artifact(parent, str(path))
    return [p.name for p in present]


def publish(stage: str, params, root: Path | str = ".",
            files: StageFiles = DEFAULT_FILES) -> bool:
    """Log the results of `stage` ("evaluate" or "frontier") from its `files` under root into
    MLflow (params.tracking): the numbers as results/evaluation.csv holds them, so that MLflow
    and the files agree and a rerun finds them equal. Never raises: on any failure prints one
    warning line on stderr. True when everything was logged."""
    if stage not in PUBLISHED:
        raise ValueError(f"stage must be 'evaluate' or 'frontier', got {stage!r}")
    root = Path(root)
    uri = resolve_tracking_uri(params.tracking.uri, root.resolve())
    try:
        with _short_http_retries():
            line, problem = _publish(stage, uri, root, files)
    except Exception as err:          # noqa: BLE001 -- the files are the results; see above
        line, problem = "", str(err).strip() or type(err).__name__
    if problem:
        reason = problem.splitlines()[0]
        if "Max retries exceeded" in reason or "Connection refused" in reason:
            reason = "the server does not answer"       # not urllib3's page of retry details
        print(f"warning: MLflow ({uri}) not (fully) updated with the {stage} results: "
              f"{reason[:300]}; the files are complete (log them later with "
              f"`python -m pipeline.results_tracking`)", file=sys.stderr)
        return False
    print(line)
    return True


def _publish(stage: str, uri: str, root: Path, files: StageFiles) -> tuple[str, str]:
    """(what was logged, what could not be: empty when everything was)."""
    sweep = pd.read_csv(root / files.sweep_csv)
    client = _client(uri)
    parents = parent_runs(client, sweep)
    if not parents:
        raise TrackingUnavailable(f"none of the child runs named in {files.sweep_csv} (column "
                                  f"mlflow_run_id) is in this store")
    done, problem = "", ""
    if stage == "evaluate":
        evaluation = pd.read_csv(root / files.evaluation_csv)
        logged, missing = log_final_metrics(client, evaluation, sweep)
        done = f"final test metrics of {logged} trials -> their child runs; "
        if missing:
            problem = f"{missing} evaluated trial(s) have no child run in this store"
    names = log_parent_artifacts(client, parents, stage_artifacts(stage, files), root)
    return f"MLflow: {done}{', '.join(names)} -> parent run {', '.join(parents)} ({uri})", problem


MAIN_DOC = "Log the evaluate and frontier results already on disk (after the store was down)."


@entry_point("python -m pipeline.results_tracking", MAIN_DOC,
             files=stage_file_names(*PUBLISHED))
def main(params: Params, files: StageFiles, args: argparse.Namespace) -> int:
    for stage, needed in (("evaluate", files.evaluation_csv), ("frontier", files.frontier_csv)):
        for path in (files.sweep_csv, needed):
            if not path.is_file():
                return error(f"{path}: not found; run `dvc repro {stage}` first")
    ok = all([publish(stage, params, files=files) for stage in PUBLISHED])
    return EXIT_OK if ok else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
