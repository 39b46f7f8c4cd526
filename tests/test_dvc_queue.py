"""DVC's experiments queue on the project (real DVC, its Celery queue workers, Ray, MLflow on
SQLite, in a temporary git repository): two queued experiments run one after the other in DVC's
temporary workspaces (<repo>/.dvc/tmp/exps/tmp*), and what is not a DVC output (the MLflow store,
Ray's experiment folders) lands in the checkout, each experiment apart, as docs/pipeline.md
("The experiments queue") tells the user to queue them."""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from support.dvc_project import dvc_env, make_project
from support.dvc_project import run as _run

QUEUED = {"exp-a": [1.0], "exp-b": [0.5]}      # one trial each (metrics.json reports beta = 1)


def _state_overrides(root: Path) -> list[str]:
    """docs/pipeline.md's recipe: the state that is not a DVC output goes to the checkout by
    absolute paths, since relative ones would resolve inside each temporary workspace, which
    DVC deletes after the run."""
    return ["-S", f"tracking.uri=sqlite:///{root}/mlflow.db",
            "-S", f"sweep.storage_path={root}/ray_results"]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return make_project(tmp_path / "project")


def _wait_for_results(root: Path, count: int, timeout: float = 1500) -> None:
    """Wait until `count` queued experiments have ended: Celery's file result backend holds
    one result per ended task (.dvc/tmp/exps/celery/result), written when DVC's `run_exp` task
    returns, after it collected the experiment. Read, never written: not by polling `dvc queue
    status`, whose worker inspection writes to DVC's file-based Celery broker while the worker
    reads it (a half-written message kills the worker with a JSONDecodeError, leaving the rest
    of the queue Queued: treeverse/dvc-task#73)."""
    results = root / ".dvc" / "tmp" / "exps" / "celery" / "result"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(list(results.glob("celery-task-meta-*"))) >= count:
            return
        time.sleep(0.5)            # lists one small folder: polling often costs nothing
    raise TimeoutError(f"{count} queued experiments did not end within {timeout:.0f} s")


def _wait_for_workers(root: Path, timeout: float = 120) -> None:
    """Wait until the queue's workers have exited (after `dvc queue stop`), so that the `dvc
    queue` commands that follow never inspect a worker that is shutting down."""
    celery = root / ".dvc" / "tmp" / "exps" / "celery"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = [int(text) for f in celery.glob("dvc-exp-worker-*.pid")
                if (text := f.read_text().strip()).isdigit()]
        if not any(Path(f"/proc/{pid}").exists() for pid in pids):
            return
        time.sleep(0.2)
    raise TimeoutError(f"the queue's workers still run {timeout:.0f} s after `dvc queue stop`")


@pytest.mark.slow
def test_two_queued_experiments_keep_their_mlflow_runs_and_ray_results_apart(project):
    from mlflow.tracking import MlflowClient

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["sweep"].update(methods=["vae"], betas=[2.0], seeds=[0])
    params["evaluate"]["iwae_k"] = 2
    params["frontier"]["recon_samples"] = 1
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # The prepared data committed once (dvc.lock, DVC's cache): the queued runs check it out.
    _run(["dvc", "repro", "prepare"], project)
    _run(["git", "add", "params.yaml", "dvc.lock"], project)
    _run(["git", "commit", "-qm", "prepared"], project)
    # The MLflow experiment with its artifact store in the checkout: the sweep would otherwise
    # create it with artifacts under the first queued run's temporary workspace.
    _run(["env", f"MLFLOW_TRACKING_URI=sqlite:///{project}/mlflow.db", "mlflow", "experiments",
          "create", "-n", params["tracking"]["experiment"],
          "-l", (project / "mlartifacts").as_uri()], project)

    try:
        for name, betas in QUEUED.items():
            _run(["dvc", "exp", "run", "--queue", "-n", name,
                  "-S", f"sweep.betas={json.dumps(betas)}", *_state_overrides(project)], project)
        # The worker it starts lives on in the background, holding any pipe it was given.
        subprocess.run(["dvc", "queue", "start"], cwd=project, env=dvc_env(), check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
        _wait_for_results(project, len(QUEUED))
    finally:
        # Once the queue is done its worker would idle 10 s (DVC's TemporaryWorker timeout)
        # before exiting on its own: stopped instead (and any experiment still running, when
        # the test failed).
        subprocess.run(["dvc", "queue", "stop", "--kill"], cwd=project, env=dvc_env(),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
    _wait_for_workers(project)
    status = _run(["dvc", "queue", "status"], project)
    assert status.count("Success") == 2, status
    for name in QUEUED:
        log = _run(["dvc", "queue", "logs", name], project)
        assert "Stage 'prepare' didn't change, skipping" in log, log[-2000:]
        assert "Running stage 'sweep'" in log and "Running stage 'frontier'" in log

    # dvc exp show: both experiments, their betas and their metrics.
    shown = json.loads(_run(["dvc", "exp", "show", "--json"], project))
    exps = {e["name"]: e for row in shown for e in (row.get("experiments") or [])}
    exps = {name: e["revs"][0]["data"] for name, e in exps.items() if name in QUEUED}
    assert set(exps) == set(QUEUED), shown
    for name, betas in QUEUED.items():
        data = exps[name]
        assert data["params"]["params.yaml"]["data"]["sweep"]["betas"] == betas
        metrics = data["metrics"]["metrics.json"]["data"]      # best -ELBO at beta = 1
        assert {k for k in metrics if k.startswith("neg_elbo.")} == \
            ({"neg_elbo.vae"} if 1.0 in betas else set())

    # One MLflow store in the checkout: one parent run per experiment, each with its own trials.
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(params["tracking"]["experiment"])
    runs = client.search_runs([experiment.experiment_id])
    parents = {r.info.run_id: r for r in runs if r.data.tags.get("echo.role") == "sweep"}
    assert sorted(p.data.params["sweep.betas"] for p in parents.values()) == ["0.5", "1"]
    children = [r for r in runs if r.data.tags.get("echo.role") == "trial"]
    assert len(children) == 2
    for child in children:
        parent = parents[child.data.tags["mlflow.parentRunId"]]
        assert float(child.data.params["beta"]) == float(parent.data.params["sweep.betas"])
    # Ray's experiment folders in the checkout: the later sweep kept the earlier one aside.
    folders = sorted(p.name for p in (project / "ray_results").iterdir() if p.is_dir())
    assert len(folders) == 2 and folders[0] == params["sweep"]["name"], folders
    # Every run's artifacts (trials' reconstruction grids, the stages' files on the parent runs)
    # are in the checkout, not in a deleted workspace.
    artifacts = (project / "mlartifacts").as_uri()
    for run in runs:
        assert run.info.artifact_uri.startswith(artifacts), run.info.artifact_uri
    for parent in parents:
        names = {a.path for a in client.list_artifacts(parent)}
        assert {"evaluation.csv", "metrics.json", "frontier.csv"} <= names, names
        assert list((project / "mlartifacts").rglob(f"{parent}/artifacts/metrics.json"))
