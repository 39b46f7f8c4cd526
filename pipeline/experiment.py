"""A sweep's Tune experiment folder, `<sweep.storage_path>/<sweep.name>`: where it is, the lock
one driver holds while it runs it, and the uid + settings (STATE_FILE) that decide whether a
rerun resumes it or archives it and starts anew.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
import uuid
from pathlib import Path

import pyarrow.fs

from echo.files import file_digest
from pipeline.config import Params
from pipeline.sweep_errors import SweepError, SweepLocked

STATE_FILE = "echo_sweep.json"     # beside Ray's state in <storage>/<name>: uid + settings


def fingerprint(params: Params, root: Path | None = None) -> dict:
    """The settings that decide what a sweep's trials are: a stored experiment is resumed
    only if these match. With `root`, the prepared data file's content counts too (DVC re-runs
    the sweep when the prepare stage wrote new data under unchanged params)."""
    data_sha256 = None
    prepared = (root / params.data.prepared_path) if root is not None else None
    if prepared is not None and prepared.exists():
        data_sha256 = file_digest(prepared, "sha256")
    # download / check_sizes cannot change the data; every other data field can.
    data = params.data.model_dump(exclude={"download", "check_sizes"})
    sweep = params.sweep.model_dump(include={
        "methods", "betas", "archs", "latent_dims", "seeds", "search", "asha", "train_limit",
        "test_limit"})
    # Packing changes what the trials are. Only present when on, so that experiments started
    # before the option existed keep their fingerprint and still resume.
    if params.sweep.pack_betas:
        sweep["pack_betas"] = True
    # device / cuda_graph change where and how fast a trial trains, not what it trains.
    return {"data": {**data, "prepared_sha256": data_sha256},
            # likelihood / gaussian_tau only when set: sweeps started before they existed resume.
            "train": params.train.model_dump(exclude={"device", "cuda_graph"} | {
                name for name in ("likelihood", "gaussian_tau")
                if getattr(params.train, name) is None}),
            "method_options": params.options,
            "sweep": sweep}


def storage_uri(params: Params, root: Path) -> str:
    """Ray needs an absolute storage path; URIs (s3://, gs://) are used as they are."""
    path = params.sweep.storage_path
    return path if "://" in path else str((root / path).resolve())


@contextlib.contextmanager
def experiment_lock(storage: str, name: str):
    """Hold `<storage>/.<name>.lock` (an OS lock: released when the process ends, however it
    ends) while this driver runs the experiment; SweepLocked, naming the holder, if another
    driver holds it. DVC's lock covers `dvc repro` only, not `python -m stages.sweep` or `ray
    submit` beside it: two drivers would train into one Tune experiment and log every MLflow
    epoch twice. A URI storage (s3://) has no such lock: nothing is held there."""
    if "://" in storage:
        yield
        return
    from filelock import FileLock, Timeout
    folder = Path(storage)
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / f".{name}.lock"), timeout=0)
    owner = folder / f".{name}.owner.json"        # the lock file itself is truncated on open
    try:
        lock.acquire()
    except Timeout:
        try:
            held = json.loads(owner.read_text())
            who = (f"pid {held['pid']} on {held['host']}, since {held['started']}: "
                   f"{held['command']}")
        except (OSError, ValueError, KeyError):
            who = f"holding {folder / f'.{name}.lock'}"
        raise SweepLocked(f"sweep {name!r} is already running in another driver ({who}); wait "
                          f"for it to end (or stop it) and run the stage again") from None
    try:
        tmp = owner.with_name(owner.name + ".tmp")
        tmp.write_text(json.dumps({
            "pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": " ".join(getattr(sys, "orig_argv", None) or ["python", *sys.argv])}))
        os.replace(tmp, owner)
        yield
    finally:
        lock.release()


def stored_uid(experiment: str) -> str | None:
    """The uid in an experiment folder's STATE_FILE, None if it has none."""
    fs, path = pyarrow.fs.FileSystem.from_uri(experiment if "://" in experiment
                                              else Path(experiment).as_uri())
    try:
        with fs.open_input_stream(f"{path}/{STATE_FILE}") as fh:
            return json.loads(fh.read().decode())["uid"]
    except (OSError, ValueError, KeyError):
        return None


def experiment_uid(experiment: str, settings: dict) -> tuple[str, bool]:
    """(uid, resumable) of the experiment folder `<storage_path>/<name>`.

    The folder is resumed only if it was started with the same `settings` (`fingerprint`);
    otherwise it is kept under `<name>@<its uid>` and a fresh experiment (new uid, hence a new
    MLflow parent run) starts, so that `dvc repro` after a params change just works."""
    fs, path = pyarrow.fs.FileSystem.from_uri(experiment if "://" in experiment
                                              else Path(experiment).as_uri())
    state_path = f"{path}/{STATE_FILE}"
    if fs.get_file_info(state_path).type == pyarrow.fs.FileType.File:
        with fs.open_input_stream(state_path) as fh:
            stored = json.loads(fh.read().decode())
        if stored["settings"] == settings:
            return stored["uid"], True
        changed = sorted(k for k in settings if settings[k] != stored["settings"].get(k))
        archive = f"{path}@{stored['uid'][:8]}"
        fs.move(path, archive)
        print(f"note: {experiment} was started with other {'/'.join(changed)} params; kept it "
              f"as {archive} and starting a new sweep", flush=True)
    elif fs.get_file_info(path).type == pyarrow.fs.FileType.Directory:
        raise SweepError(f"{experiment} exists but was not written by this sweep stage "
                         f"(no {STATE_FILE}); choose another sweep.name or remove that folder")
    uid = uuid.uuid4().hex
    fs.create_dir(path)
    with fs.open_output_stream(state_path + ".tmp") as fh:
        fh.write(json.dumps({"uid": uid, "settings": settings}, indent=1).encode())
    fs.move(state_path + ".tmp", state_path)
    return uid, False
