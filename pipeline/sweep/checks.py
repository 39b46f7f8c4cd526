"""What the sweep checks before Ray starts, so that a sweep that cannot succeed fails in
seconds with one line instead of after (or without) training: the device, the GPUs a local
Ray would have, the data (and that the decoder can model it: a Bernoulli decoder needs values
in [0, 1]), and a write in every output folder.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import fields
from pathlib import Path

from echo.checkpoint import run_likelihood
from echo.data import DataError
from echo.train import load_train_test
from pipeline.config import Params
from pipeline.sweep.experiment import storage_uri
from pipeline.data_errors import data_error_line
from pipeline.mlflow_store import resolve_tracking_uri, sqlite_path
from pipeline.sweep.errors import SweepError, unwritable
from pipeline.sweep.trainable import train_config, trial_base
from pipeline.stage_files import StageFiles
from pipeline.records import ARTIFACT_DIR
from pipeline.sweep.trials import grid_points


def check_inputs(params: Params, root: Path, files: StageFiles) -> None:
    """Fail before Ray starts: the device must exist here (for a local Ray), the data must
    load, hold at least one batch and suit the decoder (`check_decoder_data`), the experiment
    folder must lie outside the stage's outputs (`check_writable` follows, once this driver
    holds the experiment)."""
    check_device(params)
    check_experiment_place(params, root, files)
    base = trial_base(params, root)
    cfg = train_config({**base, **grid_points(params)[0], "beta": params.sweep.betas[0]})
    try:
        x_train, x_test = load_train_test(cfg)
    except (DataError, ValueError, OSError) as err:
        raise SweepError(f"data: cannot load {params.data.dataset!r} ({data_error_line(err)}); run "
                         f"`python -m stages.prepare` or fix data.raw_dir") from err
    n = len(x_train[: params.sweep.train_limit])
    if n < params.train.batch_size:
        raise SweepError(f"train.batch_size={params.train.batch_size} exceeds the {n} training "
                         f"examples (sweep.train_limit={params.sweep.train_limit}); lower it")
    check_decoder_data(params, run_likelihood(cfg), (("training", x_train), ("test", x_test)))


def check_decoder_data(params: Params, likelihood, splits) -> None:
    """Real-valued data under a Bernoulli decoder: values outside [0, 1] (a Gaussian source,
    standardised features) have no Bernoulli likelihood, and every trial would fail in its
    first epoch. Grey levels in [0, 1] are fine (cross-entropy targets, as for MNIST)."""
    if likelihood.name != "bernoulli":
        return
    for split, x in splits:
        if len(x) and (float(x.min()) < 0 or float(x.max()) > 1):
            chosen = (f"train.likelihood: {params.train.likelihood}" if params.train.likelihood
                      else "the data set's declared decoder; train.likelihood unset")
            raise SweepError(
                f"data.dataset={params.data.dataset!r}: its {split} data has values outside "
                f"[0, 1] (min {float(x.min()):.4g}, max {float(x.max()):.4g}), which a Bernoulli "
                f"decoder ({chosen}) cannot model; set train.likelihood: gaussian (and "
                f"train.gaussian_tau, its std) in params.yaml, or rescale the data into [0, 1]")


def check_writable(params: Params, root: Path, files: StageFiles) -> None:
    """Every output folder takes a write and a SQLite tracking store is intact and writable.
    Called under the experiment lock: a second driver's probe would otherwise race the first
    one's (each removes the folders it made) and fail with EEXIST instead of naming it."""
    check_outputs(params, root, files)
    check_tracking_store(params, root)


def check_experiment_place(params: Params, root: Path, files: StageFiles) -> None:
    """`<sweep.storage_path>/<sweep.name>` must not be, lie in or hold a DVC output of the
    stages (`storage_path: results` + `name: checkpoints` is the sweep's own checkpoints
    folder, which the stage swaps for a new one: the Tune experiment would be deleted)."""
    if "://" in params.sweep.storage_path:
        return
    experiment = Path(storage_uri(params, root)) / params.sweep.name
    outs = [root / getattr(files, f.name) for f in fields(StageFiles)]
    for out in outs:
        out = out.resolve()
        if out == experiment or out in experiment.parents or experiment in out.parents:
            raise SweepError(
                f"sweep.storage_path={params.sweep.storage_path!r} with sweep.name="
                f"{params.sweep.name!r} puts the Tune experiment at {experiment}, "
                f"{'inside' if out in experiment.parents or out == experiment else 'around'} "
                f"the stage output {out.relative_to(root) if root in out.parents else out}, "
                f"which the stages replace; choose a storage_path outside the outputs "
                f"(e.g. ray_results)")


def check_tracking_store(params: Params, root: Path) -> None:
    """A SQLite store that exists must be an intact database this process can write, found
    now, before the old experiment is archived or anything trains (else: tracebacks after Ray
    started). A missing one is fine: MLflow creates it."""
    import sqlite3
    db = sqlite_path(resolve_tracking_uri(params.tracking.uri, root))
    if db is None or not db.exists():
        return
    fix = ("restore it from a backup, or move it away (MLflow creates a new store and a "
           "rerun writes the sweep's runs into it) and run the stage again")
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=rw", uri=True,
                                                timeout=30)) as con:
            rows = con.execute("PRAGMA quick_check").fetchall()
            if rows != [("ok",)]:
                raise sqlite3.DatabaseError(str(rows[0][0]) if rows else "no answer")
            names = {r[0] for r in con.execute("SELECT name FROM sqlite_master")}
            if names and "runs" not in names:
                raise sqlite3.DatabaseError("not an MLflow store (no runs table)")
            try:
                # a write that is rolled back: a read-only file (root ignores permission bits,
                # not a read-only mount or the immutable attribute) fails here
                con.execute("BEGIN IMMEDIATE")
                con.execute("CREATE TABLE echo_write_probe (x)")
            finally:
                con.rollback()
    except sqlite3.OperationalError as err:
        if "readonly" in str(err) or "read-only" in str(err) or "unable to open" in str(err):
            raise SweepError(f"tracking.uri: {db} cannot be written ({err}); make it writable "
                             f"(or point tracking.uri elsewhere) and run the stage again; "
                             f"nothing was started") from None
        raise SweepError(f"tracking.uri: {db} is damaged ({err}); {fix}") from None
    except sqlite3.DatabaseError as err:
        raise SweepError(f"tracking.uri: {db} is damaged ({err}); {fix}") from None


def ray_cluster_address() -> str | None:
    """The cluster the sweep joins: $RAY_ADDRESS, None when unset, empty or `local` (Ray's word
    for "start a new local Ray", which the tests use so as never to join another one)."""
    address = os.environ.get("RAY_ADDRESS") or None
    return None if address == "local" else address


def check_device(params: Params) -> None:
    """`train.device` must exist on this machine when the trials run here. On a cluster
    ($RAY_ADDRESS) they run on its nodes, which the driver cannot look into: not checked."""
    if ray_cluster_address():
        return
    from echo.train import device_problem
    problem = device_problem(params.train.device)
    if problem:
        # Every trial would crash on it, be retried, and the sweep would end with no results.
        raise SweepError(f"train.device={params.train.device!r}: {problem}; set train.device: "
                         f"auto or cpu, or run on a machine or Ray cluster ($RAY_ADDRESS) with it")


def local_gpu_count() -> float:
    """The GPUs a Ray started here would register, counted the way Ray counts them (it honours
    CUDA_VISIBLE_DEVICES), without starting it; torch's count if that internal API moved."""
    try:
        from ray._private.accelerators import get_accelerator_manager_for_resource
        return get_accelerator_manager_for_resource("GPU").get_current_node_num_accelerators()
    except Exception:  # noqa: BLE001 - a private API: fall back rather than fail the sweep
        import torch
        return torch.cuda.device_count()


def check_local_gpus(params: Params, found: float | None = None) -> None:
    """With a Ray this driver starts, trials asking for more GPUs than it has would wait
    forever (Ray warns once a minute): refuse. A cluster may still add GPU nodes: not checked."""
    wanted = params.sweep.resources.gpu
    found = local_gpu_count() if found is None else found
    if wanted > found:
        raise SweepError(f"sweep.resources.gpu={wanted:g} but this machine has {found:g} "
                         f"GPU(s) for Ray, so no trial could start; set sweep.resources.gpu: 0 "
                         f"or join a Ray cluster with GPUs ($RAY_ADDRESS)")


PROBE_BYTES = 1 << 20     # a write of this size must succeed in every output folder


def output_folders(params: Params, root: Path, files: StageFiles) -> list[tuple[str, Path]]:
    """(what, folder) of everything the sweep writes on this machine."""
    outputs: dict[Path, list[str]] = {}     # folder -> the outputs in it
    for path in (files.sweep_csv, files.checkpoints):
        outputs.setdefault(path.parent, []).append(path.as_posix())
    folders = [(f"{parent.as_posix()}/ ({', '.join(names)})", root / parent)
               for parent, names in outputs.items()]
    folders.append((f"{ARTIFACT_DIR}/ (MLflow artifacts)", root / ARTIFACT_DIR))
    if "://" not in params.sweep.storage_path:
        folders.append(("sweep.storage_path", Path(storage_uri(params, root))))
    db = sqlite_path(resolve_tracking_uri(params.tracking.uri, root))
    if db is not None:
        folders.append(("tracking.uri", db.parent))
    return folders


def check_outputs(params: Params, root: Path, files: StageFiles) -> None:
    """Every output folder takes a file of PROBE_BYTES now (read-only, full, or a file where
    the folder should be), instead of an OSError after every trial trained. Folders made for
    the probe are removed again (a refusal leaves nothing behind; the sweep makes them)."""
    made: list[Path] = []
    try:
        _probe_outputs(params, root, files, made)
    finally:
        for folder in reversed(made):
            with contextlib.suppress(OSError):
                folder.rmdir()


def _probe_outputs(params: Params, root: Path, files: StageFiles, made: list[Path]) -> None:
    for what, folder in output_folders(params, root, files):
        try:
            missing = [p for p in (folder, *folder.parents) if not p.exists()]
            folder.mkdir(parents=True, exist_ok=True)
            made.extend(reversed(missing))
            fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=folder)
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(bytes(PROBE_BYTES))
                    fh.flush()
                    os.fsync(fh.fileno())
            finally:
                os.unlink(probe)
        except OSError as err:
            raise unwritable(what, folder, err) from None
