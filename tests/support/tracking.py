"""MLflow in tests: a sweep's runs, metric histories, and a real tracking server or UI."""
from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import sys
import urllib.request
from pathlib import Path

from .processes import child_env, serve, stop


def client(store):
    """An MlflowClient of a URI, or of a SQLite file (a Path)."""
    from mlflow.tracking import MlflowClient
    return MlflowClient(f"sqlite:///{store}" if isinstance(store, Path) else store)


def sweep_runs(store, experiment: str):
    """(client, parent runs, child runs) of an experiment: the sweep's parent runs (tag
    echo.role=sweep) and its trials' runs (echo.role=trial). `store`: a URI or a SQLite file."""
    mlflow_client = client(store)
    found = mlflow_client.get_experiment_by_name(experiment)
    everything = (mlflow_client.search_runs([found.experiment_id], max_results=1000)
                  if found else [])
    parents = [r for r in everything if r.data.tags.get("echo.role") == "sweep"]
    children = [r for r in everything if r.data.tags.get("echo.role") == "trial"]
    return mlflow_client, parents, children


def metric_steps(mlflow_client, run_id: str, name: str = "test_neg_elbo") -> list[int]:
    """The steps at which a run logged a metric, sorted: [1, 2] for a metric logged once in
    each of two epochs."""
    return sorted(m.step for m in mlflow_client.get_metric_history(run_id, name))


def histories(mlflow_client, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Every metric of a run with all its (step, value) entries."""
    return {name: sorted((m.step, m.value)
                         for m in mlflow_client.get_metric_history(run_id, name))
            for name in mlflow_client.get_run(run_id).data.metrics}


def metric_rows(db: Path, experiment: str) -> int:
    """Metric rows of an experiment in a SQLite store (read-only, tolerant of a busy file)."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True,
                                                timeout=5)) as con:
            return con.execute(
                "SELECT count(*) FROM metrics m JOIN runs r ON m.run_uuid = r.run_uuid "
                "JOIN experiments e ON r.experiment_id = e.experiment_id WHERE e.name = ?",
                (experiment,)).fetchone()[0]
    except sqlite3.Error:
        return 0


def healthy(port: int) -> bool:
    with contextlib.suppress(OSError):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as reply:
            return reply.status == 200
    return False


def start_mlflow(db: Path, log: Path, *, command: str = "server", port: int | None = None,
                 timeout: float = 240) -> tuple[subprocess.Popen, int]:
    """(process, port): a real `mlflow server` (or `mlflow ui`) over a SQLite file on a free
    port of 127.0.0.1 (`port`: that one, e.g. to restart a server where its clients look), in
    its own session, once it answers /health; its output appended to `log` (a pipe nobody reads
    would fill and block it)."""
    # Without MLflow's server-side job execution (GenAI jobs, which the project never submits):
    # by default MLflow 3's server also starts 8 huey job processes, ~30 CPU-s to start and
    # ~0.65 of a core for as long as it runs (measured; docs/performance.md). Tracking and the
    # UI are the same without them.
    def start(chosen: int) -> subprocess.Popen:
        with open(log, "ab") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "mlflow", command, "--backend-store-uri",
                 f"sqlite:///{db}", "--host", "127.0.0.1", "--port", str(chosen),
                 "--workers", "1"],
                env=child_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
                start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
    return serve(start, log, what=f"mlflow {command}", timeout=timeout, port=port,
                 ready=healthy)


@contextlib.contextmanager
def mlflow_server(db: Path, log: Path | None = None, command: str = "server"):
    """A real `mlflow server` (or `mlflow ui`) over `db` for the block: yields its URL; stopped
    (its whole session: SIGTERM, then SIGKILL) however the block ends."""
    log = log or db.parent / f"mlflow_{command}.log"
    server, port = start_mlflow(db, log, command=command)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(server, grace=30)
