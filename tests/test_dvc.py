"""The DVC pipeline: dvc.yaml's deps match the code each stage imports, and `dvc repro` runs
prepare -> sweep -> evaluate -> frontier end to end in a temporary git repository (real Ray
Tune, MLflow on SQLite, DVC) at tiny settings; then two experiments through DVC's queue, each a
whole pipeline in DVC's temporary workspace (<repo>/.dvc/tmp/exps/tmp*), with what is not a DVC
output (the MLflow store, Ray's experiment folders) landing in the checkout, each experiment
apart, as docs/pipeline.md ("The experiments queue") tells the user to queue them. One test: the
queue starts from the first run's committed state (~60 CPU-s less than a project of its own)."""
from __future__ import annotations

import ast
import io
import json
import re
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from support import REPO
from support.dvc_project import dvc_env, make_project
from support.dvc_project import run as _run
STAGES = ("prepare", "sweep", "evaluate", "frontier")
PACKAGES = ("echo", "pipeline", "stages")

def _module_file(module: str) -> str | None:
    """The project file that defines a dotted module name, if it is a project module."""
    base = REPO.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if module.split(".")[0] in PACKAGES and path.is_file():
            return path.relative_to(REPO).as_posix()
    return None


def _imports_of(path: str) -> set[str]:
    """Project modules a file imports, anywhere in it (also inside functions, where e.g. the
    sweep stage imports Ray only after validating params), with the parent packages whose
    __init__ runs first; a package that imports its modules through pkgutil imports them all."""
    source = (REPO / path).read_text()
    package = Path(path).parent.as_posix().replace("/", ".")
    if path.endswith("__init__.py") and "pkgutil.iter_modules" in source:
        names = {f"{package}.{p.stem}" for p in (REPO / path).parent.glob("*.py")}
    else:
        names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base = ".".join(parts[: len(parts) - node.level + 1]) if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            names.add(module)
            names |= {f"{module}.{a.name}" for a in node.names}   # `from pkg import module`
    modules = set()
    for name in names:
        parts = name.split(".")
        modules |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    return {f for f in map(_module_file, modules) if f is not None}


def imported_files(module: str) -> set[str]:
    """Every project file that running `python -m <module>` can import (transitively)."""
    todo, seen = [_module_file(module)], set()
    for parent in module.split(".")[:-1]:
        todo.append(_module_file(parent))
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo.extend(_imports_of(path) - seen)
    return seen


def _code_deps(stage: dict) -> set[str]:
    """The .py files a stage's code deps name (a folder stands for the .py files in it)."""
    files = set()
    for dep in stage["deps"]:
        path = REPO / dep
        if path.is_dir():
            files |= {p.relative_to(REPO).as_posix() for p in path.rglob("*.py")}
        elif dep.endswith(".py"):
            files.add(dep)
    return files


@pytest.mark.parametrize("stage", STAGES)
def test_stage_deps_are_exactly_the_code_it_imports(stage):
    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    # the module, then the files it reads and writes (tests/test_stage_cli.py)
    assert pipeline[stage]["cmd"].split()[:3] == ["python", "-m", f"stages.{stage}"]
    listed = _code_deps(pipeline[stage])
    imported = imported_files(f"stages.{stage}")
    assert imported - listed == set(), f"{stage}: imported but not a dep in dvc.yaml"
    assert listed - imported == set(), f"{stage}: a dep in dvc.yaml that it does not import"


# ---- end to end -----------------------------------------------------------------------------
OUTPUTS = ("data/prepared/digits.npz", "data/prepared/digits.manifest.json", "results/sweep.csv",
           "results/evaluation.csv", "results/comparison.csv", "metrics.json",
           "results/frontier.csv",
           "results/rd_curves.png", "results/reconstructions.png", "results/table.md")


# The queued experiments: one VAE trial each (metrics.json reports beta = 1), a small evaluation.
QUEUED = {"exp-a": [1.0], "exp-b": [0.5]}
QUEUED_SMALL = ["-S", 'sweep.methods=["vae"]', "-S", "sweep.seeds=[0]",
                "-S", "evaluate.iwae_k=2", "-S", "frontier.recon_samples=1"]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return make_project(tmp_path / "project")


def _ran(log: str) -> list[str]:
    return [s for s in STAGES if f"Running stage '{s}'" in log]


def _status(root: Path) -> set[str]:
    return set(json.loads(_run(["dvc", "status", "--json"], root)))


@pytest.mark.slow
def test_dvc_repro_end_to_end_then_two_queued_experiments_kept_apart(project: Path):
    log = _run(["dvc", "repro"], project)
    assert _ran(log) == list(STAGES)
    for name in OUTPUTS:
        assert (project / name).stat().st_size > 0, name

    sweep = pd.read_csv(project / "results/sweep.csv")
    # 2 methods x 2 betas x 2 seeds, each its own trial
    assert len(sweep) == 8 and set(sweep["status"]) == {"completed"}
    assert all(sorted(seeds) == [0, 1] for _, seeds in sweep.groupby(["method", "beta"])["seed"])
    evaluation = pd.read_csv(project / "results/evaluation.csv")
    assert len(evaluation) == 8
    assert dict(zip(evaluation["method"], evaluation["rate_kind"])) == {
        "echo": "exact", "vae": "analytic_kl"}
    vae = evaluation[evaluation["method"] == "vae"]
    echo = evaluation[evaluation["method"] == "echo"]
    # -IWAE_k is a bound at least as tight as the -ELBO (up to Monte-Carlo noise).
    assert np.all(vae["iwae_neg_log_lik"] <= vae["neg_elbo"] + 0.5)
    assert echo["iwae_neg_log_lik"].isna().all() and echo["note"].str.contains("no IWAE").all()
    assert np.all(echo["rate"] >= echo["low_rate_limit"] - 1e-6)     # Echo rate >= -d log r
    # metrics.json: flat and numeric, the best -ELBO at beta = 1 (mean over seeds) per method
    metrics = json.loads((project / "metrics.json").read_text())
    assert all(isinstance(v, float) for v in metrics.values()), metrics
    assert {k for k in metrics if k.startswith("neg_elbo.")} == {"neg_elbo.echo", "neg_elbo.vae"}
    from pipeline.results.aggregate import best_at_beta
    best = best_at_beta(evaluation, 1.0)
    assert metrics["neg_elbo.vae"] == pytest.approx(best.loc["vae", "neg_elbo"], rel=1e-5)
    # The curve score, Echo against the VAE. After 12 steps two betas may give curves that
    # share no range (then no row: tests/test_comparison.py checks the score itself).
    from pipeline.results.comparison import COMPARISON_COLUMNS
    comparison = pd.read_csv(project / "results/comparison.csv")
    assert list(comparison.columns) == COMPARISON_COLUMNS
    assert {k for k in metrics if not k.startswith("neg_elbo.")} == {
        f"D_gap.{a}_vs_{b}" for a, b, gap in zip(comparison["series_a"], comparison["series_b"],
                                                 comparison["distortion_gap"]) if np.isfinite(gap)}
    for _, row in comparison.iterrows():
        assert (row["series_a"], row["series_b"], row["rate_kind_a"]) == ("echo", "vae", "exact")
        assert row["seeds_a"] == row["seeds_b"] == 2
    table = (project / "results/table.md").read_text()
    assert "| echo |" in table and ("- **echo vs vae**:" in table) == (len(comparison) == 1)
    frontier = pd.read_csv(project / "results/frontier.csv")
    assert frontier["n_seeds"].eq(2).all() and frontier["distortion_sem"].gt(0).all()
    _check_frontier(frontier, evaluation)

    # Nothing changed: nothing runs.
    assert _ran(_run(["dvc", "repro"], project)) == []
    assert _status(project) == set()

    # A parameter re-runs only the stages that read it (dvc status lists the changed stage).
    params = yaml.safe_load((project / "params.yaml").read_text())
    for section, key, value, stage in (("frontier", "recon_samples", 3, "frontier"),
                                       ("evaluate", "iwae_k", 9, "evaluate"),
                                       ("sweep", "betas", [0.3, 2.0], "sweep")):
        changed = {**params, section: {**params[section], key: value}}
        (project / "params.yaml").write_text(yaml.safe_dump(changed, sort_keys=False))
        assert _status(project) == {stage}, (section, key)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _status(project) == set()

    # Two experiments through DVC's queue (docs/pipeline.md, "The experiments queue"), each
    # with its own betas, one VAE trial each: they run one after the other in DVC's temporary
    # workspaces, prepare skipped (its output is checked out of DVC's cache), the state that is
    # not a DVC output in the checkout by absolute paths. The MLflow experiment is the one the
    # `dvc repro` above created in the checkout, so no `mlflow experiments create` first.
    _run(["git", "add", "dvc.lock"], project)
    _run(["git", "commit", "-qm", "first run"], project)
    try:
        for name, betas in QUEUED.items():
            _run(["dvc", "exp", "run", "--queue", "-n", name,
                  "-S", f"sweep.betas={json.dumps(betas)}", *QUEUED_SMALL,
                  *_state_overrides(project)], project)
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
    _check_queued_experiments(project)

    # The documented views fit a 120-column terminal, every number in full (no "…"); exp-b
    # has no beta = 1, so neither neg_elbo.* of its row.
    for command, column in ((["dvc", "metrics", "show"], "D_gap.echo_vs_vae"),
                            (["dvc", "exp", "show", "--drop", ".*", "--keep",
                              "Experiment|neg_elbo|D_gap"], "neg_elbo.vae")):
        shown = _run(command, project, env={"COLUMNS": "120"})
        assert max(map(len, shown.splitlines()), default=0) <= 120 and "…" not in shown, shown
        assert column in shown or (column.startswith("D_gap") and comparison.empty), shown
    shown = _run(["dvc", "exp", "show", "--drop", ".*", "--keep", "Experiment|neg_elbo|D_gap",
                  "--csv"], project)
    assert {"neg_elbo.echo", "neg_elbo.vae"} <= set(shown.splitlines()[0].split(",")), shown


def _state_overrides(root: Path) -> list[str]:
    """docs/pipeline.md's recipe: the state that is not a DVC output goes to the checkout by
    absolute paths, since relative ones would resolve inside each temporary workspace, which
    DVC deletes after the run."""
    return ["-S", f"tracking.uri=sqlite:///{root}/mlflow.db",
            "-S", f"sweep.storage_path={root}/ray_results"]


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


def _check_queued_experiments(project: Path) -> None:
    """Both queued experiments succeeded apart: their own params, metrics and outputs in DVC,
    their own MLflow parent run with its trial in the checkout's store (beside the first run's),
    their own Ray folder, and every artifact in the checkout, not in a deleted workspace."""
    import dvc.api
    from mlflow.tracking import MlflowClient
    status = _run(["dvc", "queue", "status"], project)
    assert status.count("Success") == 2, status
    for name in QUEUED:
        log = _run(["dvc", "queue", "logs", name], project)
        assert _ran(log) == ["sweep", "evaluate", "frontier"], log[-2000:]
        assert "Stage 'prepare' didn't change, skipping" in log, log[-2000:]

    # dvc exp show: both experiments, their betas and their metrics; their outputs from DVC's
    # cache (evaluation.csv has their betas, frontier.csv only non-dominated points).
    shown = json.loads(_run(["dvc", "exp", "show", "--json"], project))
    exps = {e["name"]: e for row in shown for e in (row.get("experiments") or [])}
    exps = {name: e["revs"][0] for name, e in exps.items() if name in QUEUED}
    assert set(exps) == set(QUEUED), shown
    for name, betas in QUEUED.items():
        data = exps[name]["data"]
        assert data["params"]["params.yaml"]["data"]["sweep"]["betas"] == betas
        metrics = data["metrics"]["metrics.json"]["data"]      # best -ELBO at beta = 1
        assert {k for k in metrics if k.startswith("neg_elbo.")} == \
            ({"neg_elbo.vae"} if 1.0 in betas else set())
        outputs = {path: pd.read_csv(io.StringIO(dvc.api.read(
            f"results/{path}", repo=str(project), rev=exps[name]["rev"])))
            for path in ("evaluation.csv", "frontier.csv")}
        assert sorted(outputs["evaluation.csv"]["beta"]) == betas
        _check_frontier(outputs["frontier.csv"], outputs["evaluation.csv"])

    # One MLflow store in the checkout: a parent run per sweep (the first run's and one per
    # experiment), each with its own trials.
    params = yaml.safe_load((project / "params.yaml").read_text())
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(params["tracking"]["experiment"])
    runs = client.search_runs([experiment.experiment_id])
    parents = {r.info.run_id: r for r in runs if r.data.tags.get("echo.role") == "sweep"}
    children = [r for r in runs if r.data.tags.get("echo.role") == "trial"]
    trials = {parent: [c for c in children if c.data.tags["mlflow.parentRunId"] == parent]
              for parent in parents}
    assert sum(map(len, trials.values())) == len(children)
    assert sorted(map(len, trials.values())) == [1, 1, 8]      # exp-a, exp-b, the first run
    assert sorted(parents[p].data.params["sweep.betas"] for p, t in trials.items()
                  if len(t) == 1) == ["0.5", "1"]
    for parent, its_trials in trials.items():
        text = parents[parent].data.params["sweep.betas"]
        betas = {float(b) for b in re.findall(r"[0-9.]+", text)}
        assert all(float(child.data.params["beta"]) in betas for child in its_trials)
    # Ray's experiment folders in the checkout: each later sweep kept the earlier one aside.
    folders = sorted(p.name for p in (project / "ray_results").iterdir() if p.is_dir())
    assert len(folders) == 3 and folders[0] == params["sweep"]["name"], folders
    # Every run's artifacts (trials' reconstruction grids, the stages' files on the parent runs)
    # are in the checkout, not in a deleted workspace.
    artifacts = (project / "mlartifacts").as_uri()
    for run in runs:
        assert run.info.artifact_uri.startswith(artifacts), run.info.artifact_uri
    for parent in parents:
        names = {a.path for a in client.list_artifacts(parent)}
        assert {"evaluation.csv", "metrics.json", "frontier.csv"} <= names, names
        assert list((project / "mlartifacts").rglob(f"{parent}/artifacts/metrics.json"))


def _check_frontier(frontier: pd.DataFrame, evaluation: pd.DataFrame) -> None:
    """Only non-dominated seed means; per method rate rises while distortion falls."""
    from pipeline.results.aggregate import seed_points
    assert set(frontier["method"]) == set(evaluation["method"])
    means = seed_points(evaluation)
    for method, front in frontier.groupby("method"):
        points = means[means["method"] == method]
        for _, p in front.iterrows():
            # Not against its own mean: frontier.csv holds it rounded to 6 digits.
            others = points[points["trial_id"] != p["trial_id"]]
            dominated = (others["rate"] <= p["rate"]) & (others["distortion"] <= p["distortion"]) \
                & ((others["rate"] < p["rate"]) | (others["distortion"] < p["distortion"]))
            assert not dominated.any(), (method, p["trial_id"])
        front = front.sort_values("rate")
        assert np.all(np.diff(front["distortion"].to_numpy()) <= 0), method
