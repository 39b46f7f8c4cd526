"""The one checkpoint dict of a run, and the files a run writes.

    {"model", "optimizer", "scheduler", "rng", "epoch", "history", "config", "input_shape"}
    (+ "stopped": the reason, for an ensemble member whose loss turned non-finite)

`fit` writes it as <out>/checkpoint.pt, `fit_ensemble` one per member as
<out>/member_<k>/checkpoint.pt; either is what `load_model` rebuilds and what `resume=` takes.
"""
from __future__ import annotations

import copy
import json
from dataclasses import asdict
from pathlib import Path

import torch

from .files import atomic_write
from .graphs import portable_optimizer_state
from .data import REGISTRY
from .methods import Autoencoder, build_model
from .metrics import upgrade_record
from .networks import Bernoulli, Gaussian, make_likelihood
from .settings import TrainConfig

CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.json"


def checkpoint_dict(*, model: dict, optimizer: dict, scheduler: dict, epoch: int,
                    history: list[dict], config: TrainConfig, input_shape,
                    stopped: str | None = None) -> dict:
    """A snapshot: state_dict() tensors and `history` are live objects that later steps would
    change under a caller who keeps the dict; the optimizer state is made device-portable."""
    state = copy.deepcopy({"model": model, "optimizer": optimizer, "scheduler": scheduler,
                           "rng": torch.get_rng_state(), "epoch": epoch, "history": history,
                           "config": asdict(config), "input_shape": list(input_shape)})
    portable_optimizer_state(state["optimizer"])
    if stopped is not None:
        state["stopped"] = stopped
    return state


def save_checkpoint(path: str | Path, state: dict) -> None:
    atomic_write(Path(path), lambda p: torch.save(state, p))


def write_run(out: str | Path, state: dict) -> None:
    """A finished run's files: checkpoint.pt and metrics.json (its last epoch's metrics, and
    the reason it stopped early if it did)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out / CHECKPOINT_FILE, state)
    last = dict(state["history"][-1]) if state["history"] else {}
    if state.get("stopped"):
        last["stopped"] = state["stopped"]
    atomic_write(out / METRICS_FILE, lambda p: p.write_text(json.dumps(last, indent=2)))


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint safely (tensors and plain data only); the history of an older one in
    today's epoch record (`upgrade_history`)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for damaged files
        raise ValueError(f"checkpoint {path} cannot be loaded ({type(err).__name__}: "
                         f"{_load_error_reason(err)}); delete it to retrain from scratch") from err
    if isinstance(state, dict) and isinstance(state.get("history"), list) and \
            isinstance(state.get("config"), dict) and "beta" in state["config"]:
        state["history"] = upgrade_history(state["history"], float(state["config"]["beta"]))
    return state


def upgrade_history(history: list[dict], beta: float) -> list[dict]:
    """A checkpoint's history with every epoch in today's record (echo.metrics.upgrade_record:
    checkpoints written before the record held the losses and `epoch_lr`). A new list."""
    return [upgrade_record(entry, beta) for entry in history]


def _load_error_reason(err: Exception) -> str:
    """One line: torch's weights-only refusal spans paragraphs (and suggests the unsafe
    weights_only=False); keep only the reason, e.g. "Unsupported global: GLOBAL builtins.open"."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].strip().split("\n\n")[0]
    elif text.startswith("Weights only load failed"):
        # torch >= 2.6: a paragraph of advice (to load with weights_only=False, which would run
        # the file's code), then the reason, then a pointer to the docs: keep the reason.
        paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
        reasons = [p for p in paragraphs[1:] if not p.startswith("Check the documentation")]
        text = ("it holds a pickled object that is not plain data: "
                + (reasons[0] if reasons else "refused by the weights-only loader"))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else "unreadable"


def run_likelihood(config: TrainConfig) -> Bernoulli | Gaussian:
    """The decoder's likelihood of a run: `config.likelihood` / `config.gaussian_tau` where
    given, else what the data set declares (`DatasetSpec.likelihood`, `.tau`); Bernoulli for a
    data set the registry does not know (a hand-written .npz)."""
    spec = REGISTRY.get(config.dataset)
    declared = spec.likelihood if spec is not None else "bernoulli"
    name = config.likelihood or declared
    tau = config.gaussian_tau
    if tau is None and name == declared and spec is not None:
        tau = spec.tau
    if name == "bernoulli" and config.gaussian_tau is None:
        tau = None                   # the data set's tau belongs to its own Gaussian decoder
    return make_likelihood(name, tau)


def make_model(config: TrainConfig, input_shape: tuple[int, ...]) -> Autoencoder:
    """The run's model; the method takes what it needs from the run (e.g. Echo the batch size
    for its clipping factor) as its builder declares (`echo.methods.register`); its decoder's
    likelihood is `run_likelihood(config)`."""
    return build_model(config.method, arch=config.arch, latent_dim=config.latent_dim,
                       input_shape=input_shape, training=config,
                       likelihood=run_likelihood(config), **config.method_options)


def load_model(path: str | Path, device: str = "cpu") -> tuple[Autoencoder, TrainConfig]:
    """Rebuild a trained model from a checkpoint written by `fit` or `fit_ensemble`."""
    state = load_checkpoint(path)
    config = TrainConfig(**{**state["config"], "progress": False})
    model = make_model(config, tuple(state["input_shape"]))
    model.load_state_dict(state["model"])
    return model.to(device), config
