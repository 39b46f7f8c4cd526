"""The DVC pipeline: dvc.yaml's deps match the code each stage imports, and `dvc repro` runs
prepare -> sweep -> evaluate -> frontier end to end in a temporary git repository (real Ray
Tune, MLflow on SQLite, DVC) at tiny settings."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from support import REPO
from support.dvc_project import make_project
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


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return make_project(tmp_path / "project")


def _ran(log: str) -> list[str]:
    return [s for s in STAGES if f"Running stage '{s}'" in log]


def _status(root: Path) -> set[str]:
    return set(json.loads(_run(["dvc", "status", "--json"], root)))


@pytest.mark.slow
def test_dvc_repro_end_to_end(project: Path):
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

    # A new beta through a DVC experiment: prepare is skipped, the rest re-runs.
    _run(["git", "add", "dvc.lock"], project)
    _run(["git", "commit", "-qm", "first run"], project)
    log = _run(["dvc", "exp", "run", "-S", "sweep.betas=[0.3,2.0]"], project)
    assert _ran(log) == ["sweep", "evaluate", "frontier"]
    assert "Stage 'prepare' didn't change, skipping" in log
    evaluation = pd.read_csv(project / "results/evaluation.csv")
    assert sorted(evaluation["beta"].unique()) == [0.3, 2.0]
    _check_frontier(pd.read_csv(project / "results/frontier.csv"), evaluation)

    # The documented views fit a 120-column terminal, every number in full (no "…"); the
    # experiment has no beta = 1, so only the first run (the baseline row) has neg_elbo.*.
    comparison = pd.read_csv(project / "results/comparison.csv")
    for command, column in ((["dvc", "metrics", "show"], "D_gap.echo_vs_vae"),
                            (["dvc", "exp", "show", "--drop", ".*", "--keep",
                              "Experiment|neg_elbo|D_gap"], "neg_elbo.vae")):
        shown = _run(command, project, env={"COLUMNS": "120"})
        assert max(map(len, shown.splitlines()), default=0) <= 120 and "…" not in shown, shown
        assert column in shown or (column.startswith("D_gap") and comparison.empty), shown
    shown = _run(["dvc", "exp", "show", "--drop", ".*", "--keep", "Experiment|neg_elbo|D_gap",
                  "--csv"], project)
    assert {"neg_elbo.echo", "neg_elbo.vae"} <= set(shown.splitlines()[0].split(",")), shown


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
