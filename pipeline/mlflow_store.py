"""The MLflow tracking store, as both halves of pipeline/ reach it: where `tracking.uri` points
(one parser), how long a call may wait for a server (one retry policy, with named settings),
whether an error means the store is away (one check), and the commit the runs record.

No MLflow import at module level: the later stages import this without paying for it.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

SQLITE_PREFIX = "sqlite:///"
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def sqlite_path(uri: str) -> Path | None:
    """The database file of a SQLite store URI (`sqlite:///mlflow.db?timeout=20` ->
    mlflow.db), None for any other store."""
    if not uri.startswith(SQLITE_PREFIX):
        return None
    return Path(uri[len(SQLITE_PREFIX):].split("?", 1)[0])


def resolve_tracking_uri(uri: str, root: Path) -> str:
    """A relative SQLite URI (`sqlite:///mlflow.db`) is taken relative to the project root, so
    the store does not depend on the directory a stage happens to run in (the sweep creates the
    store by this rule, evaluate and frontier find it by it)."""
    db = sqlite_path(uri)
    if db is not None and not db.is_absolute():
        return SQLITE_PREFIX + str((Path(root) / uri[len(SQLITE_PREFIX):]).resolve())
    return uri


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


@dataclass(frozen=True)
class HttpRetryPolicy:
    """How long one MLflow call to a tracking server may take before it fails: MLflow's own
    default (7 retries with exponential backoff) is minutes per call, which would hold a sweep
    or a stage on a server that is down. A setting the user made in the environment wins."""
    max_retries: int
    timeout_s: int

    def env(self) -> dict[str, str]:
        return {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(self.max_retries),
                "MLFLOW_HTTP_REQUEST_TIMEOUT": str(self.timeout_s)}

    def install(self) -> None:
        """For the rest of this process (the sweep driver's tracker)."""
        for key, value in self.env().items():
            os.environ.setdefault(key, value)

    @contextlib.contextmanager
    def applied(self):
        """For the calls inside the block (a stage's publishing), then as before."""
        saved = {key: os.environ.get(key) for key in self.env()}
        self.install()
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)


# The sweep driver retries a store that is away itself (pipeline.sweep.outage, every few
# seconds, without blocking the trials): a call fails at once.
SWEEP_DRIVER_HTTP = HttpRetryPolicy(max_retries=0, timeout_s=10)
# The evaluate and frontier stages publish once: one retry, then a warning (the files are the
# results; `python -m pipeline.results.tracking` logs them later).
STAGE_HTTP = HttpRetryPolicy(max_retries=1, timeout_s=15)


def store_unreachable(err: BaseException) -> bool:
    """The store did not answer (refused, timed out, a 5xx): worth waiting for, unlike a
    refused request."""
    import requests
    from mlflow.exceptions import MlflowException
    if isinstance(err, (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                        ConnectionError, TimeoutError)):
        return True
    text = str(err)
    return isinstance(err, MlflowException) and (
        "API request to" in text or "Max retries exceeded" in text
        or "Connection refused" in text)


def first_line(err: BaseException, limit: int = 200) -> str:
    """An error's first line, at most `limit` characters (not urllib3's page of retries)."""
    text = str(err).strip().splitlines()
    line = text[0] if text else type(err).__name__
    return line if len(line) <= limit else line[:limit - 3] + "..."


@contextlib.contextmanager
def store_lock(uri: str):
    """Serialise the first use of a SQLite store among drivers on this machine: two drivers
    creating the schema of a new mlflow.db at once fail (`_alembic_tmp_experiments already
    exists`). Other stores need no lock here."""
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    from filelock import FileLock
    db = db.resolve()
    db.parent.mkdir(parents=True, exist_ok=True)
    # In the temp folder (one per store path): beside mlflow.db it would be a stray file in
    # the project, which git does not ignore.
    digest = hashlib.sha256(str(db).encode()).hexdigest()[:16]
    with FileLock(str(Path(tempfile.gettempdir()) / f"echo-rd-store-{digest}.lock"),
                  timeout=600):
        yield


def git_commit(root: Path = PROJECT_ROOT) -> str | None:
    """The commit checked out in `root` when root is the top of a git work tree (a project
    copied without .git, e.g. synced to a cluster, has none): each run's
    `mlflow.source.git.commit`, so that it leads back to its code."""
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel", "HEAD"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.split()
    if out.returncode != 0 or len(lines) != 2 or \
            Path(lines[0]).resolve() != Path(root).resolve():
        return None
    return lines[1]
