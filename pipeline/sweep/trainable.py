"""The Tune trainables (they run in Ray workers): one trial's `echo.train.fit`, or a packed
trial's `echo.ensemble.fit_ensemble` over all betas, with per-epoch reports, Tune checkpoints
and resumption; and the trial config they are given (`trial_base` + a grid point).

- `train_trial` reports every epoch, writes a Tune checkpoint every `sweep.checkpoint_every`
  epochs (at most one per `sweep.checkpoint_min_interval_s` seconds) and at the end, and
  resumes from the newest intact checkpoint it finds. A NaN/inf loss ends the trial with status
  "nonfinite"; other exceptions crash it and Tune retries it (`FailureConfig`).
- `train_packed_trial` (`sweep.pack_betas`): all betas of one (method, arch, latent_dim,
  sample) as one ensemble run; `pipeline.sweep.trials.trial_members` splits it into per-beta trials.

Trial workers import this module: MLflow, pandas and Optuna (seconds of imports per worker)
are not imported here.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pyarrow.fs
from ray import tune

from echo.train import (NonFiniteLossError, TrainConfig, fit, load_checkpoint, load_model,
                        load_train_test, save_checkpoint)
from pipeline.config import Params
from pipeline.records import MODEL_FILE, RECONSTRUCTIONS_FILE, REPORTED_METRICS, TrialStatus
from pipeline.sweep.trials import member_folder, train_config, trial_members

RECON_COUNT = 8                    # test images in the reconstruction grid
RECON_MIN_PIXELS = 56              # each image drawn at least this many pixels wide and high
RECON_GAP = 4                      # white pixels between images
RECON_CAPTION = 16                 # pixel rows above the grid for the caption


def trial_base(params: Params, root: Path) -> dict:
    """Settings shared by every trial (plain data; paths absolute for the workers): params.yaml's
    train: section as it is, the data, and every method's options (the searcher picks its
    method's, `method_trial_options`)."""
    prepared = root / params.data.prepared_path
    return {
        **params.train.model_dump(),
        "dataset": params.data.dataset,
        "prepared": str(prepared) if prepared.exists() else None,
        "data_root": str(root / params.data.raw_dir),
        "seed": params.sweep.seeds[0],
        "method_options": params.options,
        "train_limit": params.sweep.train_limit, "test_limit": params.sweep.test_limit,
        # ASHA stops trials at any epoch: checkpoint every epoch so the kept model matches
        # the trial's last metrics.
        "checkpoint_every": 1 if params.sweep.asha else params.sweep.checkpoint_every,
        "checkpoint_min_interval_s": 0 if params.sweep.asha else params.sweep.checkpoint_min_interval_s,
    }


def epoch_report(record: dict) -> dict:
    """One epoch's report of one model: its epoch record (echo.metrics.EPOCH_METRICS, the
    trained loss included) as the library made it, and the trial's status."""
    return {**record, "status": TrialStatus.RUNNING, "error": ""}


def nonfinite_report(err: NonFiniteLossError, epochs_done: int) -> dict:
    """Deterministic divergence: retrying would diverge again, so the trial ends (is not
    crashed) with the reason; the sweep goes on. Every metric name a search / scheduler may
    watch must be present (Tune checks)."""
    return {"status": TrialStatus.NONFINITE, "error": str(err), "epoch": epochs_done,
            **{name: float("nan") for name in REPORTED_METRICS}}


class CheckpointSchedule:
    """When a trial writes a Tune checkpoint: every `checkpoint_every` epochs, but at most one per
    `checkpoint_min_interval_s` seconds (a crash loses at most the larger of the two)."""

    def __init__(self, config: dict):
        self.every = config["checkpoint_every"]
        self.min_interval = config["checkpoint_min_interval_s"]
        self.saved_at = time.monotonic()

    def due(self, epoch: int) -> bool:
        if epoch % self.every or time.monotonic() - self.saved_at < self.min_interval:
            return False
        self.saved_at = time.monotonic()
        return True


def trial_resume(folders: list[str]) -> tuple[tune.Checkpoint | None, list[dict] | None, int]:
    """Where a (re)started trial goes on from: its newest intact checkpoint, the model files in
    it (one per folder: [""] for a trial, member_<k> for a packed one) and the epoch of the
    checkpoint Tune gave it (behind the newest when Tune's snapshot lagged)."""
    given = tune.get_checkpoint()
    checkpoint = newest_trial_checkpoint(given, folders[0])
    states = None
    if checkpoint is not None:
        with checkpoint.as_directory() as local:
            states = [load_checkpoint(Path(local) / folder / MODEL_FILE) for folder in folders]
    return checkpoint, states, _checkpoint_epoch(given, folders[0])


def report_with_copy(report: dict, checkpoint: tune.Checkpoint) -> None:
    """Report an existing checkpoint again, from a copy: Tune may persist it into the very folder
    it came from."""
    with tempfile.TemporaryDirectory() as folder:
        copy = tune.Checkpoint.from_directory(checkpoint.to_directory(folder))
        tune.report(report, checkpoint=copy)


def train_trial(config: dict) -> None:
    """One trial: fit with per-epoch reports and Tune checkpoints; resumes when Tune restarts it."""
    if "betas" in config:
        return train_packed_trial(config)
    cfg = train_config(config)
    checkpoint, states, known = trial_resume([""])
    resume = states[0] if states else None
    done = {"epochs": int(resume["epoch"]) if resume else 0}
    if done["epochs"] > known:
        # Tune's snapshot lagged behind this trial (its driver was killed): replay the epochs
        # it lost, so that Tune's iteration count and the tracked per-epoch metrics stay
        # complete, then go on from there (a finished trial trains nothing).
        lost = resume["history"][known:]
        for metrics in lost[:-1]:
            tune.report(epoch_report(metrics))
        report_with_copy(epoch_report(lost[-1]), checkpoint)
        if done["epochs"] >= cfg.epochs:
            return

    schedule = CheckpointSchedule(config)

    def on_epoch(epoch: int, metrics: dict, state) -> None:
        done["epochs"] = epoch
        report = epoch_report(metrics)
        last = epoch == cfg.epochs
        if not (schedule.due(epoch) or last):
            tune.report(report)
            return
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
    """All betas of a packed trial as one `fit_ensemble` run (same lr / options / seed for every
    member: each member is the separate run of its beta). Per epoch it reports the mean over
    the members still training of each metric (what the searcher sees) and member k's as
    `member_<k>/<name>`; Tune checkpoints hold `member_<k>/model.pt` per member (+ its
    reconstructions.png in the final one), on the schedule of `train_trial`'s, and a restarted
    trial resumes from the newest. A member whose loss turns NaN/inf stops alone: its
    `member_<k>/status` is nonfinite (with the reason from the first checkpoint after it
    stopped), the others go on; only when every member has stopped does the whole trial end as
    nonfinite."""
    from echo.ensemble import fit_ensemble
    cfgs = [train_config(member) for member in trial_members(config)]
    folders = [member_folder({"member": k}) for k in range(len(cfgs))]
    checkpoint, resume, known = trial_resume(folders)
    done = {"epochs": int(resume[0]["epoch"]) if resume else 0}

    def report(epoch: int, metrics: list[dict | None], states: list[dict] = ()) -> dict:
        """The epoch's report; `states` (the members' checkpoint dicts, where at hand) give a
        stopped member's reason."""
        reasons = {k: s["stopped"] for k, s in enumerate(states) if s.get("stopped")}
        live = {k: epoch_report(m) for k, m in enumerate(metrics) if m is not None}
        out = {name: sum(m[name] for m in live.values()) / len(live) for name in REPORTED_METRICS}
        out.update(status=TrialStatus.RUNNING, error="", epoch=epoch)
        for k, folder in enumerate(folders):
            if k in live:
                out.update({f"{folder}/{name}": live[k][name] for name in REPORTED_METRICS})
            else:
                out.update({f"{folder}/{name}": float("nan") for name in REPORTED_METRICS})
                out.update({f"{folder}/status": TrialStatus.NONFINITE,
                            f"{folder}/error": reasons.get(k, "")})
        return out

    if done["epochs"] > known:
        # Tune's snapshot lagged behind (see train_trial): replay the lost epochs' reports.
        histories = [{m["epoch"]: m for m in r["history"]} for r in resume]
        for epoch in range(known + 1, done["epochs"]):
            tune.report(report(epoch, [h.get(epoch) for h in histories], resume))
        report_with_copy(report(done["epochs"], [h.get(done["epochs"]) for h in histories],
                                resume), checkpoint)
        if done["epochs"] >= cfgs[0].epochs:
            return

    schedule = CheckpointSchedule(config)

    def save_members(folder: str, states: list[dict]) -> None:
        for name, member_state in zip(folders, states):
            (Path(folder) / name).mkdir()
            save_checkpoint(Path(folder) / name / MODEL_FILE, member_state)

    def on_epoch(epoch: int, metrics: list[dict | None], state) -> None:
        done["epochs"] = epoch
        if epoch == cfgs[0].epochs:     # the last report goes with the final checkpoint, below
            done["states"] = state()
        elif not schedule.due(epoch):
            tune.report(report(epoch, metrics))
        else:
            states = state()
            with tempfile.TemporaryDirectory() as folder:
                save_members(folder, states)
                tune.report(report(epoch, metrics, states),
                            checkpoint=tune.Checkpoint.from_directory(folder))

    try:
        # strategy "auto": CUDA streams on a GPU (the speed-up), a loop over members on a
        # CPU (no speed-up, but one process and one data load for all betas).
        results = fit_ensemble(cfgs[0], betas=[cfg.beta for cfg in cfgs], strategy="auto",
                               on_epoch=on_epoch, resume=resume)
    except NonFiniteLossError as err:
        tune.report(nonfinite_report(err, done["epochs"]))
        return
    states = done["states"]
    x_test = load_train_test(cfgs[0])[1]
    with tempfile.TemporaryDirectory() as folder:
        save_members(folder, states)
        for name, cfg, result in zip(folders, cfgs, results):
            if not result.stopped:
                write_reconstructions(Path(folder) / name / MODEL_FILE, cfg,
                                      Path(folder) / name / RECONSTRUCTIONS_FILE, x_test=x_test)
        final = report(cfgs[0].epochs, [None if r.stopped else r.metrics for r in results], states)
        tune.report(final, checkpoint=tune.Checkpoint.from_directory(folder))


def _checkpoint_epoch(checkpoint: tune.Checkpoint | None, folder: str = "") -> int:
    """The epoch of a trial checkpoint (`folder`: a packed trial's member folder)."""
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as local:
        return int(load_checkpoint(Path(local) / folder / MODEL_FILE)["epoch"])


def newest_trial_checkpoint(given: tune.Checkpoint | None,
                            member: str = "") -> tune.Checkpoint | None:
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
                epoch = int(load_checkpoint(Path(local) / member / MODEL_FILE)["epoch"])
        except (ValueError, OSError, KeyError):
            continue
        if epoch > best_epoch:
            best, best_epoch = candidate, epoch
    return best


def write_reconstructions(model_path: Path, cfg: TrainConfig, out: Path, x_test=None) -> None:
    """A 2-row PNG under a one-line caption: test images above, the model's reconstruction (its
    decoder likelihood's mean) below, each pixel an integer block so that an image is at least
    RECON_MIN_PIXELS wide (`x_test`: the test set if already loaded). Drawn with Pillow, not a
    16-axes matplotlib figure: every trial writes one, and a Ray worker then spends ~0.5 CPU-s
    less (importing matplotlib, drawing the axes; docs/performance.md)."""
    import numpy as np
    import torch
    from PIL import Image, ImageDraw, ImageFont

    model, _ = load_model(model_path)
    model.eval()
    if x_test is None:
        x_test = load_train_test(cfg)[1]
    x_test = x_test[: cfg.test_limit][: cfg.batch_size]
    with torch.no_grad():
        probs = model.likelihood.mean(model(x_test, cfg.beta).logits)
    count = min(RECON_COUNT, len(x_test))
    # [2, count, C, H, W] in [0, 1] -> one [rows x cols] mosaic of 8-bit pixels, a gap between
    rows = torch.stack([x_test[:count].float(), probs[:count].float()]).clamp(0, 1).numpy()
    _, _, channels, height, width = rows.shape
    scale = max(1, -(-RECON_MIN_PIXELS // max(height, width)))       # ceil: small digits grow
    tiles = np.kron(rows, np.ones((scale, scale)))                   # each pixel a block
    cell_h, cell_w = height * scale + RECON_GAP, width * scale + RECON_GAP
    caption = f"{cfg.method} beta={cfg.beta:g}: data (top), reconstruction (bottom)"
    font = ImageFont.load_default()                              # ImageDraw's own default
    canvas_w = max(count * cell_w + RECON_GAP, int(font.getlength(caption)) + 1 + 2 * RECON_GAP)
    mosaic = np.ones((RECON_CAPTION + 2 * cell_h + RECON_GAP, canvas_w, channels))
    for r in range(2):
        for c in range(count):
            top, left = RECON_CAPTION + RECON_GAP + r * cell_h, RECON_GAP + c * cell_w
            mosaic[top:top + height * scale, left:left + width * scale] = \
                tiles[r, c].transpose(1, 2, 0)
    pixels = (mosaic * 255).round().astype(np.uint8)
    image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels,
                            mode="L" if channels == 1 else "RGB")
    ImageDraw.Draw(image).text((RECON_GAP, 3), caption, fill=0 if channels == 1 else (0, 0, 0),
                               font=font)
    image.save(out)
