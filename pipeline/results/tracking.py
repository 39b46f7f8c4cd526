"""MLflow view of a sweep's results: the evaluate and frontier stages' numbers and files.

After the sweep (pipeline.sweep.tracking), every trial has a child run with per-epoch metrics. This
module adds what the later stages compute, so that the MLflow UI shows the sweep's result:

- evaluate: into each trial's child run the final test metrics `final_test_rate`,
  `final_test_distortion`, `final_test_neg_elbo`, `final_test_iwae_neg_log_lik` (only where
  the method has an IWAE bound, with its k as the param `iwae_k`) and `rate_kind` (a param, so
  it can go on a chart's axis, and a tag); into the sweep's parent run metrics.json's numbers
  as its metrics (best test -ELBO per method at beta = 1, each pair's curve gaps) and the
  artifacts evaluation.csv, comparison.csv and metrics.json;
- frontier: into the parent run frontier.csv, rd_curves.png, reconstructions.png, table.md,
  and its description (`mlflow.note.content`): table.md's "In words", the R-D figure and how to
  compare the trials in the UI.

`runs_link` is the address of the sweep's runs table in MLflow's UI, which the sweep and
frontier stages print.

The child run of a trial is the `mlflow_run_id` column of results/sweep.csv; the parent is that
run's `mlflow.parentRunId` tag. Re-running a stage adds nothing that is already there: a final
metric whose latest value is the same is not logged again (a changed value is appended one
step later, so the UI shows the newest), and an artifact is overwritten under its name.

The files are the results; MLflow is a view of them. So a store that cannot be reached (or
holds no such runs) never fails a stage whose files are written: `publish` prints one warning
line and returns, and `python -m pipeline.results.tracking` logs the existing files later.

Independent of the sweep's half (pipeline.sweep imports Ray Tune: seconds, and the sweep's
code as DVC deps of evaluate/frontier): both take the store's rules from pipeline.mlflow_store.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import pandas as pd

from pipeline.cli import EXIT_FAILED, EXIT_OK, entry_point, error
from pipeline.config import Params
from pipeline.mlflow_store import (STAGE_HTTP, first_line, resolve_tracking_uri, sqlite_path,
                                   store_unreachable)
from pipeline.records import NOTE_TAG, PARENT_TAG, SWEEP_UID_TAG, TrialStatus
from pipeline.results.headline import pair_gaps
from pipeline.stage_files import DEFAULT_FILES, WRITES, StageFiles, stage_file_names

# evaluation.csv column -> final metric of the child run; prefixed so that they never mix with
# the per-epoch `test_*` history the sweep logs (step = epoch).
FINAL_METRICS = (("rate", "final_test_rate"), ("distortion", "final_test_distortion"),
                 ("neg_elbo", "final_test_neg_elbo"),
                 ("iwae_neg_log_lik", "final_test_iwae_neg_log_lik"))
FINAL_PARAMS = ("rate_kind", "iwae_k")      # evaluation.csv columns that are settings
FINAL_TAGS = ("rate_kind",)
IN_WORDS = "## In words"                     # the section of table.md the description quotes
UI_ADDRESS = "http://127.0.0.1:5000"         # `mlflow ui`'s default address
PUBLISHED = ("evaluate", "frontier")      # the stages whose results go to MLflow


def sweep_hint(params, sweep: pd.DataFrame, root: Path | str = ".") -> str:
    """ui_hint for a sweep's table (results/sweep.csv): where its runs are in MLflow's UI;
    without an experiment to name (a store that cannot be read), how to open the UI."""
    uri = params.tracking.uri
    try:
        with STAGE_HTTP.applied():
            client = _client(resolve_tracking_uri(uri, Path(root).resolve()))
            runs = _existing_runs(client, list(_run_ids(sweep).values())[:1])
            experiment = next(iter(runs.values())).info.experiment_id
    except Exception:         # noqa: BLE001 -- a hint; the sweep's results are written
        return f"MLflow: mlflow ui --backend-store-uri {uri}"
    return ui_hint(uri, experiment)


def stage_artifacts(stage: str, files: StageFiles = DEFAULT_FILES) -> tuple[str, ...]:
    """The files of `stage` that go to the sweep's parent run: all it writes."""
    return tuple(getattr(files, name).as_posix() for name in WRITES[stage])


EVALUATE_ARTIFACTS = stage_artifacts("evaluate")     # at their default places
FRONTIER_ARTIFACTS = stage_artifacts("frontier")


class TrackingUnavailable(RuntimeError):
    """The store cannot be used for these results; the message says why."""





def _client(uri: str):
    db = sqlite_path(uri)
    if db is not None:
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


def _setting_text(value) -> str | None:
    """A CSV cell as a param's text ("8", not "8.0"); None when empty."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value)
    return text if text.strip() else None


def _changed_metrics(client, run, values: dict[str, float], now: int) -> list:
    """Metric entries for the finite `values` the run does not already hold as its latest
    value: a new name at step 0, a changed value one step after its last (so the UI shows the
    newest), an equal one not at all (a re-run adds nothing)."""
    from mlflow.entities import Metric
    metrics = []
    for name, value in values.items():
        if value is None or not math.isfinite(value):
            continue
        latest = run.data.metrics
        if name in latest:
            if math.isclose(latest[name], value, rel_tol=1e-12, abs_tol=0.0):
                continue
            step = max(m.step for m in client.get_metric_history(run.info.run_id, name)) + 1
        else:
            step = 0
        metrics.append(Metric(name, value, now, step))
    return metrics


def log_final_metrics(client, evaluation: pd.DataFrame, sweep: pd.DataFrame) -> tuple[int, int]:
    """Each evaluated trial's final test numbers into its child run, each value once, and how
    they were obtained (rate_kind, iwae_k) as params. Returns (child runs that hold them now,
    trials whose child run is missing)."""
    from mlflow.entities import Param, RunTag
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
        metrics = _changed_metrics(client, run, {
            name: float(row[column]) if pd.notna(row[column]) else math.nan
            for column, name in FINAL_METRICS}, now)
        tags = [RunTag(name, str(row[name])) for name in FINAL_TAGS
                if pd.notna(row.get(name)) and run.data.tags.get(name) != str(row[name])]
        params = []
        for name in FINAL_PARAMS:
            value, held = _setting_text(row.get(name)), run.data.params.get(name)
            if value is None:
                continue
            if held is None:
                params.append(Param(name, value))
            elif run.data.tags.get(name, held) != value:
                # MLflow never changes a param: a re-evaluation with another value (another
                # evaluate.iwae_k) records the newest as a tag of the same name.
                tags.append(RunTag(name, value))
        tags = list({tag.key: tag for tag in tags}.values())     # one per name in a batch
        if metrics or tags or params:
            client.log_batch(run.info.run_id, metrics=metrics, params=params, tags=tags)
        logged += 1
    return logged, missing


def log_parent_metrics(client, parents: list[str], summary: dict) -> int:
    """The sweep's headline numbers (pipeline.results.headline: `neg_elbo.<method>`,
    `D_gap.<a>_vs_<b>`, ...) as the parent runs' metrics, each value once. Returns how many
    names it holds."""
    values = {str(k): float(v) for k, v in summary.items()
              if isinstance(v, (int, float)) and not isinstance(v, bool)}
    now = int(time.time() * 1000)
    for parent, run in _existing_runs(client, parents).items():
        metrics = _changed_metrics(client, run, values, now)
        for start in range(0, len(metrics), 1000):              # MLflow's batch limit
            client.log_batch(parent, metrics=metrics[start:start + 1000])
    return len(values)


def in_words(table_md: str) -> str:
    """The "In words" section of results/table.md (pipeline.results.report), without its heading."""
    lines = table_md.splitlines()
    if IN_WORDS not in lines:
        return ""
    body = lines[lines.index(IN_WORDS) + 1:]
    end = next((i for i, line in enumerate(body) if line.startswith("## ")), len(body))
    return "\n".join(body[:end]).strip()


COMPARE_CLICKS = (
    "- the link the evaluate and frontier stages print opens the saved view "
    "\"{name}: rate vs distortion\" (also in the **Views** menu of the experiment's runs "
    "page): unfold this run (the ⊞ before its name) and its scatter chart shows every trial;",
    "- by hand, from the experiment's runs page (**Model training**): unfold this run, "
    "**Chart** (the view switch above the table), the eye icon's **Show all runs** (the charts "
    "show the first 10 runs otherwise), then **Add chart** → **Scatter chart**, X axis "
    "`final_test_rate`, Y axis `final_test_distortion`, **Add chart**.",
)


def description(parent_id: str, table_md: str, name: str = "sweep",
                rd_curves: str = "rd_curves.png") -> str:
    """The parent run's description (markdown): what the sweep shows, its R-D figure (served
    by the same MLflow server: a relative link to the run's artifact), and how to compare the
    trials in the UI. Kept under MLflow's 8,000-character tag limit."""
    words = in_words(table_md)
    figure = f"![R-D curves](get-artifact?path={rd_curves}&run_uuid={parent_id})"
    tail = ["", figure, "",
            "**Every trial** is a child run of this one, coloured by method as in the figure, "
            "with its final test numbers (`final_test_rate`, `final_test_distortion`, "
            "`final_test_neg_elbo`). Rate against distortion of all of them:", "",
            *(line.replace("{name}", name) for line in COMPARE_CLICKS), "",
            "Files (Artifacts): `table.md` (tables), `comparison.csv` (curve gaps with their "
            "intervals), `frontier.csv`, `evaluation.csv`, `reconstructions.png`."]
    head = "### In words\n\n"
    room = 8000 - len(head) - len("\n".join(tail)) - 20
    if len(words) > room:
        words = words[:room].rsplit("\n", 1)[0] + "\n- … (the rest: `table.md`)"
    return head + words + "\n" + "\n".join(tail)


def describe_parents(client, parents: list[str], table_md: Path) -> bool:
    """Set each parent run's description from results/table.md (unchanged text: no write)."""
    if not table_md.is_file():
        return False
    text = table_md.read_text()
    for parent, run in _existing_runs(client, parents).items():
        note = description(parent, text, run.info.run_name)
        if run.data.tags.get(NOTE_TAG) != note:
            client.set_tag(parent, NOTE_TAG, note)
    return True


# A saved view of the runs page (MLflow 3's "Views" menu): an experiment tag holding the page's
# state, opened by `?viewStateShareKey=<key>`. Not a documented API (the UI's own format, checked
# against MLflow 3.17 by tests/test_mlflow_ui.py); a UI that cannot read it opens the plain runs
# table, and COMPARE_CLICKS build the same chart by hand.
VIEW_TAG = "mlflow.sharedViewState."
VIEW_KEY = "echo-rd-rate-distortion"
RD_AXES = ("final_test_rate", "final_test_distortion")
# The parallel-coordinates chart's axes: only what every method's run has. MLflow leaves out of
# a parallel-coordinates chart every run that lacks one of its metrics, and Echo has no IWAE
# metric (its marginal q(z) is not a density, so there is no importance-weighted likelihood),
# so final_test_iwae_neg_log_lik would silently drop every Echo run from it.
PARALLEL_PARAMS = ("method", "beta")
PARALLEL_METRICS = (*RD_AXES, "final_test_neg_elbo")


def chart_view_state(sweep_uid: str) -> dict:
    """The runs page of one sweep (parent and trials) in chart mode, every run shown, with a
    scatter chart of every trial's final test rate against its distortion and a parallel-
    coordinates chart of method, beta, rate, distortion and -ELBO (no IWAE: see
    PARALLEL_METRICS)."""
    section = "echo-rd-rate-distortion"
    scatter = {"uuid": "echo-rd-rd-scatter", "type": "SCATTER", "runsCountToCompare": 10000,
               "metricSectionId": section, "deleted": False, "isGenerated": False,
               "xaxis": {"key": RD_AXES[0], "type": "METRIC"},
               "yaxis": {"key": RD_AXES[1], "type": "METRIC"}}
    parallel = {"uuid": "echo-rd-parallel", "type": "PARALLEL", "runsCountToCompare": 10000,
                "metricSectionId": section, "deleted": False, "isGenerated": False,
                "selectedParams": list(PARALLEL_PARAMS), "selectedMetrics": list(PARALLEL_METRICS),
                "showAllRuns": True}
    return {"searchFilter": f"tags.`echo.sweep_uid` = '{sweep_uid}'",
            "orderByKey": "attributes.start_time", "orderByAsc": True, "startTime": "ALL",
            "lifecycleFilter": "Active", "datasetsFilter": [], "modelVersionFilter": "All Runs",
            "selectedColumns": [f"metrics.`{m}`" for m in (*RD_AXES, "final_test_neg_elbo")]
            + ["params.`method`", "params.`beta`"],
            "columnOrder": [], "columnWidths": {}, "runsHiddenMode": "SHOW_ALL",
            "compareRunCharts": [scatter, parallel],
            "compareRunSections": [{"uuid": section, "name": "Rate-distortion (test set)",
                                    "display": True, "isReordered": False, "deleted": False,
                                    "isGenerated": False}],
            "viewMaximized": False, "runListHidden": False, "isAccordionReordered": False,
            "useGroupedValuesInCharts": False, "hideEmptyCharts": True, "groupBy": None,
            "groupsExpanded": {},
            "globalLineChartConfig": {"xAxisKey": "step", "lineSmoothness": 0,
                                      "selectedXAxisMetricKey": ""}}


def save_chart_view(client, experiment_id: str, sweep_uid: str, name: str) -> str:
    """Save chart_view_state as a view of the experiment (replacing this project's earlier
    one: the newest sweep's). Returns its key."""
    import base64
    import zlib
    state = json.dumps(chart_view_state(sweep_uid), separators=(",", ":"))
    now = int(time.time() * 1000)
    value = {"name": name, "createdAt": now, "updatedAt": now,
             "state": "deflate;" + base64.b64encode(zlib.compress(state.encode())).decode()}
    client.set_experiment_tag(experiment_id, VIEW_TAG + VIEW_KEY, json.dumps(value))
    return VIEW_KEY


def runs_link(uri: str, experiment_id: str, view: str | None = None) -> str:
    """The runs page of an experiment in MLflow's UI, with "Model training" chosen (MLflow 3
    opens an experiment on its GenAI overview), in chart mode with the saved `view` if given:
    the tracking server itself for an http(s) store, else where `mlflow ui` serves a local
    store by default."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else UI_ADDRESS
    link = f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    return f"{link}&compareRunsMode=CHART&viewStateShareKey={view}" if view else link


def ui_hint(uri: str, experiment_id: str, view: str | None = None) -> str:
    """One line: how to open the sweep's runs (the command to serve a local store first)."""
    link = runs_link(uri, experiment_id, view)
    if uri.startswith(("http://", "https://")):
        return f"MLflow: {link}"
    return f"MLflow: `mlflow ui --backend-store-uri {uri}`, then open {link}"


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
        with STAGE_HTTP.applied():
            line, problem = _publish(stage, uri, root, files, params.tracking.uri)
    except Exception as err:          # noqa: BLE001 -- the files are the results; see above
        # not urllib3's page of retry details for a server that is down
        line, problem = "", ("the server does not answer" if store_unreachable(err)
                             else first_line(err, 300))
    if problem:
        reason = problem.splitlines()[0]
        print(f"warning: MLflow ({uri}) not (fully) updated with the {stage} results: "
              f"{reason[:300]}; the files are complete (log them later with "
              f"`python -m pipeline.results.tracking`)", file=sys.stderr)
        return False
    print(line)
    return True


def _publish(stage: str, uri: str, root: Path, files: StageFiles,
             shown_uri: str) -> tuple[str, str]:
    """(what was logged and where to see it, what could not be: empty when all was)."""
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
        # metrics.json's numbers and every pair's curve gaps (pipeline.results.headline)
        summary = json.loads((root / files.metrics_json).read_text()) \
            if (root / files.metrics_json).is_file() else {}
        if (root / files.comparison_csv).is_file():
            summary.update(pair_gaps(pd.read_csv(root / files.comparison_csv)))
        done += f"{log_parent_metrics(client, parents, summary)} headline metrics, "
    else:
        if describe_parents(client, parents, root / files.table_md):
            done = "description, "
    names = log_parent_artifacts(client, parents, stage_artifacts(stage, files), root)
    parent = client.get_run(parents[-1])
    experiment = parent.info.experiment_id
    view = save_chart_view(client, experiment, parent.data.tags.get(SWEEP_UID_TAG, ""),
                           f"{parent.info.run_name}: rate vs distortion")
    return (f"MLflow: {done}{', '.join(names)} -> parent run {', '.join(parents)} ({uri})\n"
            f"{ui_hint(shown_uri, experiment, view)}"), problem


MAIN_DOC = "Log the evaluate and frontier results already on disk (after the store was down)."


@entry_point("python -m pipeline.results.tracking", MAIN_DOC,
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
