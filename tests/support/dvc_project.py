"""A temporary git + DVC repository of the project, for the tests that run `dvc repro` and DVC's
experiments queue on it."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import yaml

from .params import DROP, REPO, tiny_params

CODE = ("echo/", "pipeline/", "stages/", "benchmarks/")
# Overrides of the project's params.yaml, section by section (DVC needs every field a stage
# lists to be in it). No beta warm-up: 12 steps are shorter than the default's, and the betas
# should differ. One trial at a time: a Ray worker process costs ~7 CPU-s of imports and these
# trials ~1 s each; the `dvc repro` end-to-end test (before the queue scenario joined it) took
# 135 CPU-s (137 s) alone this way against 168 CPU-s (146 s) with two at a time.
# (tests/test_sweep.py and tests/test_faults.py are the tests of overlapping trials.)
TINY_PARAMS = tiny_params(
    "tiny", train={"lr": 0.002, "beta_warmup_steps": 0},
    sweep={"methods": ["echo", "vae"], "betas": [0.3, 1.0], "seeds": [0, 1],
           "train_limit": 300, "max_concurrent": 1},
    tracking=DROP, evaluate={"iwae_k": 8, "batch_size": DROP})


def project_files() -> list[str]:
    """The files of a clean clone: those git tracks (as they are in the checkout, changes
    included), and code not yet added (echo/, pipeline/, stages/, benchmarks/); never another
    untracked file (a stale dvc.lock, caches, results, Ray or MLflow state)."""
    def listed(*args: str) -> list[str]:
        out = subprocess.run(["git", "ls-files", "-z", *args], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout
        return [f for f in out.split("\0") if f]
    new_code = [f for f in listed("--others", "--exclude-standard") if f.startswith(CODE)]
    return sorted(f for f in {*listed("--cached"), *new_code} if (REPO / f).is_file())


def dvc_env(**extra: str) -> dict:
    """What the commands run with: a git identity (DVC commits experiments), a local Ray of
    their own (never another one on this machine), the code of the temporary repository (no
    PYTHONPATH), no analytics."""
    return {**os.environ, "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@localhost",
            "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@localhost",
            "RAY_ADDRESS": "local", "PYTHONPATH": "", "DVC_NO_ANALYTICS": "1", **extra}


def run(args: list[str], cwd: Path, timeout: int = 600, env: dict | None = None) -> str:
    """Run a command; its stdout and stderr, or a failure with their ends."""
    result = subprocess.run(args, cwd=cwd, env=dvc_env(**(env or {})), capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n" \
                                   f"{result.stderr[-3000:]}"
    return result.stdout + result.stderr


def make_project(root: Path, overrides: dict = TINY_PARAMS) -> Path:
    """The project's files in `root`, params.yaml with `overrides` merged in section by section,
    committed to a new git repository."""
    for name in project_files():
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((REPO / name).read_bytes())
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in overrides.items():
        params[section] = {**params.get(section, {}), **values}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "project"], root)
    return root
