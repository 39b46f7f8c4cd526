"""The rate-distortion sweep on Ray Tune: a grid over method x beta x arch x latent_dim, Optuna
for the learning rate and Echo's clipping factor at each grid point, MLflow tracking from the
driver, and resumption of an interrupted sweep.

    run_sweep(load_params("params.yaml"), root=Path("."))   # -> results/sweep.csv

Design (docs/sweep.md explains it at length):
- Ray Tune cannot combine `grid_search` with a searcher, so `GridOptunaSearch` owns the grid:
  it hands out every grid point `search.num_samples` times and asks a separate Optuna study
  (`OptunaSearch`, TPE) per grid point for lr / clip_factor. The full grid is always covered,
  and each study learns from the trials of its own (method, beta, ...) only.
- `train_trial` (runs in a Ray worker) calls `echo.train.fit`, reports every epoch, writes a
  Tune checkpoint every `sweep.checkpoint_every` epochs (at most one per
  `sweep.checkpoint_min_interval_s` seconds) and at the end, and resumes from
  `tune.get_checkpoint()`. A NaN/inf loss ends the trial with status "nonfinite"; other
  exceptions crash it and Tune retries it (`FailureConfig`).
- The experiment lives in `<storage_path>/<name>`; if it exists, the sweep is resumed with
  `Tuner.restore(resume_errored=True)`.
- `sweep.pack_betas`: one Tune trial per (method, arch, latent_dim, sample) trains all betas as
  one `echo.ensemble.fit_ensemble` run (`train_packed_trial`); `trial_members` splits such a
  trial into its per-beta trials, so MLflow and the CSV stay one run / row per beta.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import pickle
import shutil
import socket
import sys
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pyarrow.fs
import ray
from ray import tune
from ray.tune.schedulers import FIFOScheduler
from ray.tune.search import ConcurrencyLimiter, Searcher

from echo import clip_factor as solve_clip_factor
from echo.data import DataError
from echo.train import (NonFiniteLossError, TrainConfig, fit, load_checkpoint, load_model,
                        load_train_test, save_checkpoint)
from pipeline.config import Params

# Trial workers import this module for `train_trial`: MLflow, pandas and Optuna (seconds of
# imports per worker) are imported only in the driver-side functions that use them.
EPOCH_METRICS = ("train_rate", "train_distortion", "train_neg_elbo",
                 "test_rate", "test_distortion", "test_neg_elbo")
# What a trial reports per epoch (and per member, for a packed trial): any may be the search
# metric, so all must be present in every report (Tune checks).
REPORTED_METRICS = (*EPOCH_METRICS, "train_loss", "test_loss")
# The files a trial writes into its final Tune checkpoint.
MODEL_FILE = "model.pt"
RECONSTRUCTIONS_FILE = "reconstructions.png"

RESULTS_CSV = Path("results/sweep.csv")
CHECKPOINT_DIR = Path("results/checkpoints")
CSV_COLUMNS = ["trial_id", "method", "dataset", "arch", "latent_dim", "beta", "seed", "lr",
               "clip_factor",
               "status", "error", "epochs_done", "checkpoint", "mlflow_run_id", *EPOCH_METRICS]
STATE_FILE = "echo_sweep.json"     # beside Ray's state in <storage>/<name>: uid + settings
RECON_COUNT = 8                    # test images in the reconstruction grid


class SweepError(RuntimeError):
    """The sweep cannot start or did not finish; the message says why and what to do."""


class SweepInterrupted(SweepError):
    """Stopped before every trial finished; running the stage again resumes it."""


# -- the grid and its search ---------------------------------------------------------------
def trial_name(point: dict, sample: int, num_samples: int) -> str:
    """Readable, deterministic trial id, e.g. `echo_b0.3_mlp_z32` (`_seed1` when the sweep has
    several seeds, `_s1` for repeated Optuna samples); `echo_betas_mlp_z32` for a packed point
    (all betas in one trial)."""
    beta = f"b{point['beta']:g}" if "beta" in point else "betas"
    name = f"{point['method']}_{beta}_{point['arch']}_z{point['latent_dim']}"
    if "seed" in point:
        name = f"{name}_seed{point['seed']}"
    return f"{name}_s{sample}" if num_samples > 1 else name


def grid_points(params: Params) -> list[dict]:
    """The searcher's grid; with `sweep.pack_betas` a point has no beta but all `betas`. With
    several `sweep.seeds` each point is repeated per seed (its `seed` key); with one, the seed
    is the trials' shared setting (`trial_base`) and names stay as before seeds existed."""
    s = params.sweep
    seeds = [{"seed": seed} for seed in s.seeds] if len(s.seeds) > 1 else [{}]
    if s.pack_betas:
        return [{"method": m, "betas": [float(b) for b in s.betas], "arch": a,
                 "latent_dim": int(z), **seed}
                for m, a, z, seed in itertools.product(s.methods, s.archs, s.latent_dims, seeds)]
    return [{"method": m, "beta": float(b), "arch": a, "latent_dim": int(z), **seed}
            for m, b, a, z, seed in itertools.product(s.methods, s.betas, s.archs,
                                                      s.latent_dims, seeds)]


def trial_members(config: dict) -> list[dict]:
    """The per-beta trials one Tune trial stands for: the trial itself, or, for a packed trial,
    one config per beta with its own `trial_id` (as the unpacked sweep names it) and its index
    `member` in the ensemble. MLflow runs and CSV rows are made per member."""
    if "betas" not in config:
        return [config]
    rest = {k: v for k, v in config.items() if k not in ("betas", "member_ids")}
    return [{**rest, "beta": beta, "trial_id": name, "member": k}
            for k, (beta, name) in enumerate(zip(config["betas"], config["member_ids"]))]


def member_result(result: dict, member: dict) -> dict:
    """A member's view of its trial's result: a packed trial reports member k's metrics as
    `member_<k>/<name>` beside their means (what the searcher sees) and the shared keys."""
    if "member" not in member:
        return result
    prefix = f"{member_folder(member)}/"
    shared = {k: v for k, v in result.items() if "/" not in k}
    return {**shared, **{k[len(prefix):]: v for k, v in result.items() if k.startswith(prefix)}}


def member_folder(member: dict) -> str:
    """Where a member's files are in its trial's checkpoint ("" for an unpacked trial)."""
    return f"member_{member['member']}" if "member" in member else ""


def search_space(params: Params, method: str) -> dict:
    """Optuna's space at one grid point: lr log-uniform, clip_factor uniform (Echo only)."""
    search = params.sweep.search
    space = {}
    if search.lr is not None:
        space["lr"] = tune.loguniform(search.lr.low, search.lr.high)
    if search.clip_factor is not None and method == "echo":
        space["clip_factor"] = tune.uniform(search.clip_factor.low, search.clip_factor.high)
    return space


def echo_terms(params: Params) -> int:
    """d_max, the number of terms of the truncated Echo sum (Sec. 5)."""
    return params.train.d_max if params.train.d_max is not None else params.train.batch_size - 1


class PickledState:
    """Tune saves searchers and schedulers with the experiment; these keep all their state in
    plain attributes, so the whole instance dict is what a resumed sweep needs back."""

    def save(self, checkpoint_path: str):
        with open(checkpoint_path, "wb") as fh:
            pickle.dump(self.__dict__, fh)

    def restore(self, checkpoint_path: str):
        with open(checkpoint_path, "rb") as fh:
            self.__dict__.update(pickle.load(fh))


class GridOptunaSearch(PickledState, Searcher):
    """Every grid point `num_samples` times, sample-major (all points' sample 0 first, so each
    study has feedback before its next ask); lr / clip_factor from one Optuna study per point
    where a search range is given, else the defaults in `base`."""

    def __init__(self, points: list[dict], spaces: list[dict], base: dict, num_samples: int,
                 metric: str, mode: str = "min", seed: int = 0):
        from ray.tune.search.optuna import OptunaSearch
        super().__init__(metric=metric, mode=mode)
        self.points, self.base, self.num_samples = points, base, num_samples
        self.studies = [OptunaSearch(space=space, metric=metric, mode=mode, seed=seed + i)
                        if space else None for i, space in enumerate(spaces)]
        self.assigned: dict[str, int] = {}       # Ray trial id -> grid point index
        self.next_index = 0

    @property
    def total(self) -> int:
        return len(self.points) * self.num_samples

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True                              # metric, mode and space are fixed here

    def suggest(self, trial_id: str):
        if self.next_index >= self.total:
            return Searcher.FINISHED
        sample, index = divmod(self.next_index, len(self.points))
        self.next_index += 1
        point = self.points[index]
        study = self.studies[index]
        searched = study.suggest(trial_id) if study is not None else {}
        self.assigned[trial_id] = index
        config = {**self.base, **point, **searched, "sample": sample,
                  "trial_id": trial_name(point, sample, self.num_samples)}
        if point["method"] != "echo":
            config["clip_factor"] = None
        if "betas" in point:        # packed: the ids of its per-beta trials (`trial_members`)
            config["member_ids"] = [trial_name({**point, "beta": b}, sample, self.num_samples)
                                    for b in point["betas"]]
        return config

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        index = self.assigned.get(trial_id)
        study = self.studies[index] if index is not None else None
        if study is None:
            return
        value = (result or {}).get(self.metric)
        if value is None or not math.isfinite(value) or (result or {}).get("status") != "running":
            study.on_trial_complete(trial_id, None, error=True)   # crashed or diverged
        else:
            study.on_trial_complete(trial_id, result)


class GridPointASHA(PickledState, FIFOScheduler):
    """ASHA early stopping among the samples of one grid point only: one `ASHAScheduler` per
    (method, beta, arch, latent_dim). A single ASHA over the sweep would compare an Echo trial
    at beta 3 with a VAE at beta 0.1 and stop whole grid points, leaving holes in the R-D curve;
    here it only stops the worse learning rates / clipping factors of a point."""

    def __init__(self, metric: str, mode: str, max_t: int, grace_period: int):
        super().__init__()
        self._metric, self._mode = metric, mode
        self.options = {"metric": metric, "mode": mode, "time_attr": "training_iteration",
                        "max_t": max_t, "grace_period": grace_period}
        self.schedulers: dict[tuple, object] = {}

    def _of(self, trial):
        from ray.tune.schedulers import ASHAScheduler
        c = trial.config
        key = (c["method"], c["beta"], c["arch"], c["latent_dim"], c.get("seed"))
        if key not in self.schedulers:
            self.schedulers[key] = ASHAScheduler(**self.options)
        return self.schedulers[key]

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return True                              # fixed at construction

    def on_trial_add(self, tune_controller, trial):
        self._of(trial).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result):
        return self._of(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result):
        self._of(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial):
        self._of(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return f"ASHA per grid point ({len(self.schedulers)} points)"


# -- the trainable (runs in a Ray worker) -------------------------------------------------
def train_config(config: dict) -> TrainConfig:
    options = {}
    if config["method"] == "echo":
        options = {"clip_factor": config["clip_factor"], "d_max": config["d_max"],
                   "replace": config["replace"]}
    return TrainConfig(
        method=config["method"], dataset=config["dataset"], data_root=config["data_root"],
        prepared=config["prepared"], arch=config["arch"], latent_dim=config["latent_dim"],
        beta=config["beta"], epochs=config["epochs"], batch_size=config["batch_size"],
        lr=config["lr"], lr_decay_start=config["lr_decay_start"], seed=config["seed"],
        **({} if config["beta_warmup_steps"] is None
           else {"beta_warmup_steps": config["beta_warmup_steps"]}),
        device=config["device"], train_limit=config["train_limit"],
        test_limit=config["test_limit"], method_options=options, progress=False,
        cuda_graph=config["cuda_graph"])


def epoch_report(metrics: dict, beta: float) -> dict:
    """One epoch's report of one model."""
    return {**metrics, "status": "running", "error": "",
            # the trained objective D + beta R, a possible search metric
            "train_loss": metrics["train_distortion"] + beta * metrics["train_rate"],
            "test_loss": metrics["test_distortion"] + beta * metrics["test_rate"]}


def nonfinite_report(err: NonFiniteLossError, epochs_done: int) -> dict:
    """Deterministic divergence: retrying would diverge again, so the trial ends (is not
    crashed) with the reason; the sweep goes on. Every metric name a search / scheduler may
    watch must be present (Tune checks)."""
    return {"status": "nonfinite", "error": str(err), "epoch": epochs_done,
            **{name: float("nan") for name in REPORTED_METRICS}}


def train_trial(config: dict) -> None:
    """One trial: fit with per-epoch reports and Tune checkpoints; resumes when Tune restarts it."""
    if "betas" in config:
        return train_packed_trial(config)
    cfg = train_config(config)
    every, min_interval = config["checkpoint_every"], config["checkpoint_min_interval_s"]
    given = tune.get_checkpoint()
    checkpoint = newest_trial_checkpoint(given)
    resume = None
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            resume = load_checkpoint(Path(folder) / MODEL_FILE)
    done = {"epochs": int(resume["epoch"]) if resume else 0}

    known = _checkpoint_epoch(given)
    if done["epochs"] > known:
        # Tune's snapshot lagged behind this trial (its driver was killed): replay the epochs
        # it lost, so that Tune's iteration count and the tracked per-epoch metrics stay
        # complete, then go on from there (a finished trial trains nothing). The checkpoint is
        # reported from a copy: Tune may persist it into the very folder it came from.
        lost = resume["history"][known:]
        for metrics in lost[:-1]:
            tune.report(epoch_report(metrics, cfg.beta))
        with tempfile.TemporaryDirectory() as folder:
            tune.report(epoch_report(lost[-1], cfg.beta),
                        checkpoint=tune.Checkpoint.from_directory(checkpoint.to_directory(folder)))
        if done["epochs"] >= cfg.epochs:
            return

    saved = {"at": time.monotonic()}

    def on_epoch(epoch: int, metrics: dict, state) -> None:
        done["epochs"] = epoch
        report = epoch_report(metrics, cfg.beta)
        last = epoch == cfg.epochs
        due = epoch % every == 0 and time.monotonic() - saved["at"] >= min_interval
        if not (last or due):
            tune.report(report)
            return
        saved["at"] = time.monotonic()
        with tempfile.TemporaryDirectory() as folder:
            save_checkpoint(Path(folder) / MODEL_FILE, state())
            if last:
                write_reconstructions(Path(folder) / MODEL_FILE, cfg,
                                      Path(folder) / RECONSTRUCTIONS_FILE)
            tune.report(report, checkpoint=tune.Checkpoint.from_directory(folder))

    try:
        fit(cfg, on_epoch=on_epoch, resume=resume)
    except NonFiniteLossError as err:
        tune.report(nonfinite_report(err, done["epochs"]))


def train_packed_trial(config: dict) -> None:
    """All betas of a packed trial as one `fit_ensemble` run (same lr / clip factor / seed for
    every member: each member is the separate run of its beta). Per epoch it reports the mean
    over members of each metric (what the searcher sees) and member k's as `member_<k>/<name>`.

    Its only Tune checkpoint is the final one, `member_<k>/model.pt` (+ reconstructions.png)
    per member: `fit_ensemble` cannot resume, so a packed trial that Tune restarts trains from
    epoch 0 again. A NaN/inf loss of any member ends the whole trial as nonfinite."""
    from echo.ensemble import fit_ensemble
    cfgs = [train_config(member) for member in trial_members(config)]
    done = {"epochs": 0}

    def report(epoch: int, metrics: list[dict]) -> dict:
        members = [epoch_report(m, cfg.beta) for m, cfg in zip(metrics, cfgs)]
        out = {name: sum(m[name] for m in members) / len(members) for name in REPORTED_METRICS}
        out.update(status="running", error="", epoch=epoch)
        for k, m in enumerate(members):
            out.update({f"member_{k}/{name}": m[name] for name in REPORTED_METRICS})
        return out

    def on_epoch(epoch: int, metrics: list[dict]) -> None:
        done["epochs"], done["report"] = epoch, report(epoch, metrics)
        if epoch < cfgs[0].epochs:      # the last one goes with the checkpoint, written after
            tune.report(done["report"])

    with tempfile.TemporaryDirectory() as folder:
        try:
            # strategy "auto": CUDA streams on a GPU (the speed-up), a loop over members on a
            # CPU (no speed-up, but one process and one data load for all betas).
            fit_ensemble(replace(cfgs[0], out=folder), betas=[cfg.beta for cfg in cfgs],
                         strategy="auto", on_epoch=on_epoch)
        except NonFiniteLossError as err:
            tune.report(nonfinite_report(err, done["epochs"]))
            return
        x_test = load_train_test(cfgs[0])[1]
        for k, cfg in enumerate(cfgs):        # fit_ensemble wrote member_<k>/checkpoint.pt
            member = Path(folder) / f"member_{k}"
            os.replace(member / "checkpoint.pt", member / MODEL_FILE)
            write_reconstructions(member / MODEL_FILE, cfg, member / RECONSTRUCTIONS_FILE,
                                  x_test=x_test)
        tune.report(done["report"], checkpoint=tune.Checkpoint.from_directory(folder))


def _checkpoint_epoch(checkpoint: tune.Checkpoint | None) -> int:
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as folder:
        return int(load_checkpoint(Path(folder) / MODEL_FILE)["epoch"])


def newest_trial_checkpoint(given: tune.Checkpoint | None) -> tune.Checkpoint | None:
    """The newest intact checkpoint this trial persisted; `given` (Tune's) if none is newer.

    Tune restores a trial from the last checkpoint in its experiment snapshot, which is
    throttled: after a SIGKILLed driver it can lag behind the checkpoints the trial had already
    written to its folder (even its final one), or hold none, and the trial would train those
    epochs again. The trial's own `checkpoint_*` folders in storage say how far it really got.
    """
    try:
        storage = tune.get_context().get_storage()     # DeveloperAPI: the trial's folder
        fs, folder = storage.storage_filesystem, storage.trial_fs_path
    except Exception:  # noqa: BLE001 - outside a Tune session or an older Ray: the given one
        if given is None:
            return None
        fs, folder = given.filesystem, given.path.rstrip("/").rsplit("/", 1)[0]
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(folder, allow_not_found=True))
    except OSError:
        return given
    names = [i.base_name for i in infos if i.type == pyarrow.fs.FileType.Directory
             and i.base_name.startswith("checkpoint_")]
    # By epoch, not by name: after a restore Tune numbers new folders from its snapshot, so a
    # higher-numbered stale folder can hold an earlier epoch. Half-written folders fail to load.
    best, best_epoch = given, -1
    for name in names:
        candidate = tune.Checkpoint(f"{folder}/{name}", filesystem=fs)
        try:
            with candidate.as_directory() as local:
                epoch = int(load_checkpoint(Path(local) / MODEL_FILE)["epoch"])
        except (ValueError, OSError, KeyError):
            continue
        if epoch > best_epoch:
            best, best_epoch = candidate, epoch
    return best


def write_reconstructions(model_path: Path, cfg: TrainConfig, out: Path, x_test=None) -> None:
    """A 2-row PNG: test images above, the model's reconstruction probabilities below
    (`x_test`: the test set if already loaded)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    model, _ = load_model(model_path)
    model.eval()
    if x_test is None:
        x_test = load_train_test(cfg)[1]
    x_test = x_test[: cfg.test_limit][: cfg.batch_size]
    with torch.no_grad():
        probs = torch.sigmoid(model(x_test, cfg.beta).logits)
    count = min(RECON_COUNT, len(x_test))
    fig, axes = plt.subplots(2, count, figsize=(count, 2.2), squeeze=False)
    for col in range(count):
        for row, images in enumerate((x_test, probs)):
            image = images[col].permute(1, 2, 0).squeeze(-1).numpy()
            axes[row, col].imshow(image, cmap="gray", vmin=0, vmax=1)
            axes[row, col].axis("off")
    fig.suptitle(f"{cfg.method} β={cfg.beta:g}: data (top), reconstruction (bottom)", fontsize=8)
    fig.savefig(out, dpi=80)
    plt.close(fig)


# -- driver side ---------------------------------------------------------------------------
def trial_base(params: Params, root: Path) -> dict:
    """Settings shared by every trial (plain data; paths absolute for the workers)."""
    prepared = root / params.data.prepared_path
    return {
        "dataset": params.data.dataset,
        "prepared": str(prepared) if prepared.exists() else None,
        "data_root": str(root / params.data.raw_dir),
        "epochs": params.train.epochs, "batch_size": params.train.batch_size,
        "lr": params.train.lr, "lr_decay_start": params.train.lr_decay_start,
        "beta_warmup_steps": params.train.beta_warmup_steps,
        "seed": params.sweep.seeds[0], "device": params.train.device,
        "d_max": params.train.d_max, "replace": params.train.replace,
        "clip_factor": solve_clip_factor(echo_terms(params)),
        "train_limit": params.sweep.train_limit, "test_limit": params.sweep.test_limit,
        # ASHA stops trials at any epoch: checkpoint every epoch so the kept model matches
        # the trial's last metrics.
        "checkpoint_every": 1 if params.sweep.asha else params.sweep.checkpoint_every,
        "checkpoint_min_interval_s": 0 if params.sweep.asha else params.sweep.checkpoint_min_interval_s,
        "cuda_graph": params.train.cuda_graph,
    }


def fingerprint(params: Params, root: Path | None = None) -> dict:
    """The settings that decide what a sweep's trials are: a stored experiment is resumed
    only if these match. With `root`, the prepared data file's content counts too (DVC re-runs
    the sweep when the prepare stage wrote new data under unchanged params)."""
    data_sha256 = None
    prepared = (root / params.data.prepared_path) if root is not None else None
    if prepared is not None and prepared.exists():
        digest = hashlib.sha256()
        with open(prepared, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
        data_sha256 = digest.hexdigest()
    # download / check_sizes cannot change the data; every other data field can.
    data = params.data.model_dump(exclude={"download", "check_sizes"})
    sweep = params.sweep.model_dump(include={
        "methods", "betas", "archs", "latent_dims", "seeds", "search", "asha", "train_limit",
        "test_limit"})
    # Packing changes what the trials are. Only present when on, so that experiments started
    # before the option existed keep their fingerprint and still resume.
    if params.sweep.pack_betas:
        sweep["pack_betas"] = True
    return {"data": {**data, "prepared_sha256": data_sha256},
            "train": params.train.model_dump(exclude={"device", "cuda_graph"}),
            "sweep": sweep}


def check_inputs(params: Params, root: Path) -> None:
    """Fail before Ray starts: the device must exist here (for a local Ray), the data must
    load and hold at least one batch, and every output folder must take a write."""
    check_device(params)
    base = trial_base(params, root)
    cfg = train_config({**base, **grid_points(params)[0], "beta": params.sweep.betas[0],
                        "clip_factor": None})
    try:
        x_train, _ = load_train_test(cfg)
    except (DataError, ValueError, OSError) as err:
        raise SweepError(f"data: cannot load {params.data.dataset!r} ({err}); run "
                         f"`python -m stages.prepare` or fix data.raw_dir") from err
    n = len(x_train[: params.sweep.train_limit])
    if n < params.train.batch_size:
        raise SweepError(f"train.batch_size={params.train.batch_size} exceeds the {n} training "
                         f"examples (sweep.train_limit={params.sweep.train_limit}); lower it")
    check_outputs(params, root)


def check_device(params: Params) -> None:
    """`train.device` must exist on this machine when the trials run here. On a cluster
    ($RAY_ADDRESS) they run on its nodes, which the driver cannot look into: not checked."""
    if os.environ.get("RAY_ADDRESS"):
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


def output_folders(params: Params, root: Path) -> list[tuple[str, Path]]:
    """(what, folder) of everything the sweep writes on this machine."""
    from pipeline.tracking import resolve_tracking_uri
    folders = [("results/ (results/sweep.csv, results/checkpoints)", root / RESULTS_CSV.parent),
               ("mlartifacts/ (MLflow artifacts)", root / "mlartifacts")]
    if "://" not in params.sweep.storage_path:
        folders.append(("sweep.storage_path", Path(storage_uri(params, root))))
    uri = resolve_tracking_uri(params.tracking.uri, root)
    if uri.startswith("sqlite:///"):
        folders.append(("tracking.uri", Path(uri[len("sqlite:///"):]).parent))
    return folders


def check_outputs(params: Params, root: Path) -> None:
    """Every output folder takes a file of PROBE_BYTES now (read-only, full, or a file where
    the folder should be), instead of an OSError after every trial trained."""
    for what, folder in output_folders(params, root):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=folder)
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(bytes(PROBE_BYTES))
                    fh.flush()
                    os.fsync(fh.fileno())
            finally:
                os.unlink(probe)
        except OSError as err:
            reason = err.strerror or type(err).__name__
            raise SweepError(f"{what}: cannot write to {folder} ({reason}); make it writable or "
                             f"free space there before the sweep trains") from None


def storage_uri(params: Params, root: Path) -> str:
    """Ray needs an absolute storage path; URIs (s3://, gs://) are used as they are."""
    path = params.sweep.storage_path
    return path if "://" in path else str((root / path).resolve())


class SweepLocked(SweepError):
    """Another driver is running the same experiment."""


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


def connect_ray(num_cpus: int | None = None) -> bool:
    """Join the cluster at $RAY_ADDRESS, else start Ray on this machine (with `num_cpus`
    logical CPUs, default all); True if this call started it."""
    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS") or None
    # Local workers import `echo` / `pipeline` from this checkout; cluster nodes run the image.
    code = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (code, os.environ.get("PYTHONPATH")) if p)
    runtime_env = None if address else {"env_vars": {"PYTHONPATH": path}}
    ray.init(address=address, num_cpus=None if address else num_cpus,
             runtime_env=runtime_env, include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    return True


class _TrialStatus(tune.Callback):
    """Collects every trial at the end (also after an interruption), restored ones included."""

    def __init__(self):
        self.trials: list = []

    def on_experiment_end(self, trials, **info):
        self.trials = list(trials)

    @property
    def status(self) -> dict[str, str]:
        return {t.config["trial_id"]: t.status for t in self.trials}


def run_sweep(params: Params, root: Path | str = ".", *, callbacks: tuple = (),
              verbose: int = 1):
    """Run (or resume) the sweep; write results/sweep.csv and results/checkpoints/<trial>.pt
    under `root`, and return the table (a pandas DataFrame). Raises SweepInterrupted if
    trials remain unfinished."""
    from pipeline.tracking import SweepTracker, resolve_tracking_uri
    root = Path(root).resolve()
    check_inputs(params, root)
    sweep = params.sweep
    storage = storage_uri(params, root)
    experiment = f"{storage}/{sweep.name}"
    if not ray.is_initialized() and not os.environ.get("RAY_ADDRESS"):
        check_local_gpus(params)            # before Ray starts: seconds, not a hang
    with experiment_lock(storage, sweep.name):
        started = connect_ray()
        try:
            previous = stored_uid(experiment)
            uid, resumable = experiment_uid(experiment, fingerprint(params, root))
            tracker = SweepTracker(
                resolve_tracking_uri(params.tracking.uri, root), params.tracking.experiment,
                sweep.name, uid, artifact_root=root / "mlartifacts",
                parent_params={"dataset": params.data.dataset, "epochs": params.train.epochs,
                               "methods": ",".join(sweep.methods),
                               "betas": ",".join(f"{b:g}" for b in sweep.betas),
                               "archs": ",".join(sweep.archs),
                               "latent_dims": ",".join(map(str, sweep.latent_dims)),
                               "num_samples": sweep.search.num_samples}).open()
            if previous is not None and previous != uid:
                # The params changed and the old experiment was archived: its runs still open
                # (a killed or interrupted driver) will never be resumed; close them.
                tracker.close_sweep(previous)
            return _fit_and_collect(params, root, experiment, storage, resumable, tracker,
                                    callbacks, verbose)
        except Exception as err:
            from pipeline.tracking import store_unreachable
            if isinstance(err, SweepError) or not store_unreachable(err):
                raise
            # At start-up or while writing the results: one line, and the rerun resumes.
            raise SweepInterrupted(
                f"tracking.uri {params.tracking.uri}: the store is unreachable "
                f"({str(err).strip().splitlines()[0][:200]}); start it (or fix tracking.uri) "
                f"and run the stage again: the sweep resumes where it stopped") from None
        finally:
            if started:
                ray.shutdown()


class SweepFailed(SweepError):
    """Every trial ended, but none completed: there are no results to record."""


def _fit_and_collect(params: Params, root: Path, experiment: str, storage: str, resumable: bool,
                     tracker, callbacks: tuple, verbose: int):
    sweep = params.sweep
    statuses = _TrialStatus()
    all_callbacks = [tracker, statuses, *callbacks]
    trainable = tune.with_resources(train_trial, {"cpu": sweep.resources.cpu,
                                                  "gpu": sweep.resources.gpu})
    if resumable and tune.Tuner.can_restore(experiment):
        tuner = tune.Tuner.restore(experiment, trainable, resume_errored=True)
        # The run config (callbacks included) is restored from the pickled first run; use
        # this run's callbacks, with the tracker connected to the current store, and this
        # run's max_concurrent / max_failures / checkpointing (docs/sweep.md: they may change).
        apply_resume_knobs(tuner, params, root, all_callbacks)
    else:
        run_config = tune.RunConfig(
            name=sweep.name, storage_path=storage, verbose=verbose, callbacks=all_callbacks,
            failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
            # Tune snapshots its state whenever a trial has saved num_to_keep checkpoints:
            # 4 keeps that rare.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=4))
        tuner = tune.Tuner(trainable, tune_config=tune_config(params, root),
                           run_config=run_config)
    tuner.fit()
    # Results a store outage held back are written first (waiting while it may come back).
    if tracker.unreachable or not tracker.drain(wait=tracker.max_outage):
        raise SweepInterrupted(
            f"{tracker.unreachable or 'tracking store unreachable'}; the sweep stopped with its "
            f"trials saved: run the stage again when the store is back to resume it")
    expected = len(grid_points(params)) * sweep.search.num_samples
    unfinished = [t for t, s in statuses.status.items() if s not in ("TERMINATED", "ERROR")]
    missing = expected - len(statuses.status) + len(unfinished)
    if missing:
        tracker.finish_sweep("KILLED")
        raise SweepInterrupted(
            f"sweep {sweep.name!r} stopped with {missing} of {expected} trials unfinished; "
            f"run the stage again to resume it from {experiment}")
    ended = {id(t): trial_outcome(t) for t in statuses.trials}
    if not any(status == "completed" for status, _ in ended.values()):
        # Nothing to evaluate: exit non-zero (DVC records nothing) instead of an empty table
        # that evaluate and frontier would accept. The child runs are closed with their reason.
        for trial in statuses.trials:
            status, error = ended[id(trial)]
            for config in trial_members(trial.config):
                tracker.finish_trial(config, status, error)
        tracker.finish_sweep("FAILED")
        counts = {}
        for status, _ in ended.values():
            counts[status] = counts.get(status, 0) + 1
        first = next((error for _, error in ended.values() if error), "")
        raise SweepFailed(
            f"sweep {sweep.name!r}: no trial completed "
            f"({', '.join(f'{n} {s}' for s, n in sorted(counts.items()))}"
            f"{f'; first error: {first}' if first else ''}); nothing written to {RESULTS_CSV}; "
            f"fix the cause and run the stage again (failed trials are retried, changed params "
            f"start a new sweep)")
    try:
        table = collect_results(statuses.trials, tracker, root)
    except OSError as err:
        tracker.finish_sweep("FAILED")
        raise SweepError(f"cannot write the sweep's results under {root / 'results'} "
                         f"({err.strerror or err}); make room or make it writable and run the "
                         f"stage again: the trained trials are kept and are not retrained") from None
    tracker.finish_sweep("FINISHED")
    return table


class _RunLimiter(ConcurrencyLimiter):
    """Tune's ConcurrencyLimiter, but its limit is this run's `sweep.max_concurrent`: a
    restored experiment would put back the limit it was saved with."""

    def set_state(self, state: dict) -> None:
        limit = self.max_concurrent
        super().set_state(state)
        self.max_concurrent = limit


# Tune restores a wrapper's state under its class name: keep the saved limiter's.
_RunLimiter.__name__ = "ConcurrencyLimiter"


class _ResumeKnobs(tune.Callback):
    """Applies this run's settings that may change between runs (docs/sweep.md) to a restored
    experiment, whose trials and searcher keep the values they were saved with: every trial's
    retry budget; the settings (`knobs`: checkpointing, device, CUDA graphs) and resources of
    trials not running yet (pending, paused, to be retried) and of those the searcher creates."""

    def __init__(self, searcher, max_failures: int, knobs: dict, resources: dict):
        self.searcher, self.max_failures, self.knobs = searcher, max_failures, knobs
        self.resources = resources

    def on_step_begin(self, iteration, trials, **info):
        self.searcher.base.update(self.knobs)              # trials it has yet to create
        for trial in trials:
            trial.max_failures = self.max_failures
            if trial.status in ("PENDING", "PAUSED", "ERROR"):
                trial.config.update(self.knobs)
                if trial.placement_group_factory.required_resources != self.resources:
                    trial.update_resources(tune.PlacementGroupFactory([self.resources]))


def apply_resume_knobs(tuner, params: Params, root: Path, callbacks: list) -> None:
    """This run's callbacks and resume knobs on a restored Tuner (Ray's internals: the
    restored run and tune configs are the pickled ones of the first run)."""
    sweep = params.sweep
    local = tuner._local_tuner
    run_config = local.get_run_config()
    run_config.failure_config = tune.FailureConfig(max_failures=sweep.max_failures)
    tune_cfg = local._tune_config
    searcher = tune_cfg.search_alg
    base = trial_base(params, root)
    resources = {"CPU": sweep.resources.cpu, "GPU": sweep.resources.gpu}
    run_config.callbacks = [*callbacks, _ResumeKnobs(
        searcher, sweep.max_failures,
        {k: base[k] for k in ("checkpoint_every", "checkpoint_min_interval_s", "device",
                              "cuda_graph")},
        {k: v for k, v in resources.items() if v})]
    if not isinstance(searcher, ConcurrencyLimiter):
        tune_cfg.search_alg = _RunLimiter(searcher, max_concurrent=sweep.max_concurrent)
        tune_cfg.max_concurrent_trials = None


def trial_outcome(trial) -> tuple[str, str]:
    """(status, error) of an ended Tune trial: completed, nonfinite or failed."""
    if trial.status == "ERROR":
        return "failed", trial_error_text(trial)
    if (trial.last_result or {}).get("status") == "nonfinite":
        return "nonfinite", trial.last_result.get("error", "")
    return "completed", ""


def tune_config(params: Params, root: Path) -> tune.TuneConfig:
    sweep = params.sweep
    points = grid_points(params)
    searcher = GridOptunaSearch(points, [search_space(params, p["method"]) for p in points],
                                trial_base(params, root), sweep.search.num_samples,
                                metric=sweep.search.metric, mode="min", seed=params.sweep.seeds[0])
    scheduler = None
    if sweep.asha:
        scheduler = GridPointASHA(metric=sweep.search.metric, mode="min",
                                  max_t=params.train.epochs,
                                  grace_period=max(1, params.train.epochs // 4))
    return tune.TuneConfig(search_alg=searcher, scheduler=scheduler,
                           num_samples=searcher.total, max_concurrent_trials=sweep.max_concurrent,
                           trial_name_creator=_trial_id, trial_dirname_creator=_trial_id,
                           # one worker process trains trial after trial: no re-import of torch
                           reuse_actors=True)


def _trial_id(trial) -> str:
    return trial.config["trial_id"]


def collect_results(trials, tracker, root: Path):
    """One row per trial (Tune's `Trial`s; per beta for packed trials); completed trials' final
    checkpoints copied to results/checkpoints."""
    import pandas as pd
    staging = Path(tempfile.mkdtemp(prefix=".checkpoints-", dir=_ensure(root / "results")))
    rows = []
    try:
        for trial in trials:
            status, error = trial_outcome(trial)
            members = trial_members(trial.config)
            copied = status == "completed" and trial.checkpoint is not None
            if copied:     # one download of the trial's checkpoint for all its members
                with trial.checkpoint.as_directory() as folder:
                    for config in members:
                        shutil.copyfile(Path(folder) / member_folder(config) / MODEL_FILE,
                                        staging / f"{config['trial_id']}.pt")
            for config in members:
                metrics = member_result(trial.last_result or {}, config)
                checkpoint = (CHECKPOINT_DIR / f"{config['trial_id']}.pt").as_posix() \
                    if copied else ""
                # Finishes the MLflow child of a trial that ended in an earlier, interrupted run.
                tracker.finish_trial(config, status, error,
                                     trial.checkpoint if status == "completed" else None,
                                     member_folder(config))
                rows.append(csv_row(config, metrics, status, error, checkpoint))
        runs = tracker.child_runs()
        for row in rows:
            row["mlflow_run_id"] = runs.get(row["trial_id"], "")
        table = pd.DataFrame(rows, columns=CSV_COLUMNS).sort_values("trial_id", ignore_index=True)
        _replace_dir(staging, root / CHECKPOINT_DIR)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    out = root / RESULTS_CSV
    tmp = out.with_name(out.name + ".tmp")
    table.to_csv(tmp, index=False)
    os.replace(tmp, out)
    return table


def csv_row(config: dict, metrics: dict, status: str, error: str, checkpoint: str) -> dict:
    """One CSV row (without its MLflow run id) of one per-beta trial."""
    return {"trial_id": config["trial_id"], "method": config["method"],
            "dataset": config["dataset"], "arch": config["arch"],
            "latent_dim": config["latent_dim"], "beta": config["beta"], "seed": config["seed"],
            "lr": config["lr"],
            "clip_factor": config["clip_factor"], "status": status, "error": error,
            "epochs_done": int(metrics.get("epoch", 0)), "checkpoint": checkpoint,
            **{name: metrics.get(name, float("nan")) for name in EPOCH_METRICS}}


def _replace_dir(new: Path, target: Path) -> None:
    """Swap a fully written folder into place (the old one is removed only afterwards)."""
    old = target.with_name(f".{target.name}-old-{int(time.time() * 1000)}")
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def trial_error_text(trial) -> str:
    """The last line of a crashed trial's error (the exception), for MLflow and the CSV."""
    error = trial.get_error()
    text = str(error).strip() if error is not None else ""
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "trial failed (no error recorded)"


__all__ = ["CSV_COLUMNS", "GridOptunaSearch", "SweepError", "SweepFailed", "SweepInterrupted",
           "SweepLocked", "connect_ray",
           "grid_points", "run_sweep", "train_trial", "trial_name"]
