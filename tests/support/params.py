"""The repository, tiny settings for a pipeline run, and the stage commands.

`tiny_params` is the one builder of the small settings the pipeline tests run with (digits, a
few hundred images, 4 latents, the MLP, two epochs): each test states only what it changes.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
# `python -m stages.sweep` as DVC runs it, quietly (Tune's progress tables off).
SWEEP = [sys.executable, "-m", "stages.sweep", "--params", "params.yaml", "--verbose", "0"]

# What every tiny setting has: the digits, two epochs of batch 50, the MLP with 4 latents.
BASE = {
    "data": {"dataset": "digits"},
    "train": {"epochs": 2, "batch_size": 50},
    "sweep": {"methods": ["vae"], "betas": [0.5, 1.0], "archs": ["mlp"], "latent_dims": [4]},
}
# What a run of the stages adds: few images, the CPU, two trials at once, a SQLite store, a
# small evaluation.
RUN = {
    "train": {"lr": 3e-3, "device": "cpu"},
    "sweep": {"train_limit": 200, "test_limit": 100, "max_concurrent": 2},
    "tracking": {"uri": "sqlite:///mlflow.db"},
    "evaluate": {"iwae_k": 4, "batch_size": 50, "test_limit": 100},
    "frontier": {"recon_samples": 2},
}
# A checkpoint after every epoch, with no minimum interval: what the resume tests need.
EVERY_EPOCH = {"checkpoint_every": 1, "checkpoint_min_interval_s": 0}


class _Drop:
    def __repr__(self) -> str:
        return "DROP"


DROP = _Drop()      # a value in `tiny_params`' changes that removes the key (None is a value)


def merged(base: dict, changes: dict) -> dict:
    """`base` with `changes` applied: dicts merge key by key, DROP removes a key, any other
    value (None included) replaces."""
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if value is DROP:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def tiny_params(name: str = "tiny", *, run: bool = True, **sections) -> dict:
    """Raw params.yaml content: BASE (and RUN, for a run of the stages) with `sections` merged
    in (`train={"epochs": 6}`, `sweep={...}`, `tracking=DROP` to leave a section out). The sweep
    (and with `run` the MLflow experiment) is named `name`, unless `sections` says otherwise."""
    raw = merged(BASE, {"sweep": {"name": name}})
    if run:
        raw = merged(merged(raw, RUN), {"tracking": {"experiment": name}})
    return merged(raw, sections)


def write_params(root: Path, raw: dict, name: str = "params.yaml") -> Path:
    path = Path(root) / name
    path.write_text(yaml.safe_dump(raw))
    return path


def as_params(raw: dict):
    """The validated `pipeline.config.Params` of raw settings."""
    from pipeline.config import Params
    return Params.model_validate(raw)


def write_sweep_params(root: Path, name: str, *, betas=(0.5, 1.0), epochs: int = 2,
                       db: str | Path = "mlflow.db", uri: str | None = None,
                       train: dict | None = None, **sweep) -> Path:
    """params.yaml in `root` for the fault tests' sweep: VAE trials (one per beta) of 200
    digits, a checkpoint every epoch, one CPU each, no retries (`max_failures` 0, unless
    `sweep` says otherwise), no beta warm-up, tracked in the SQLite file `db` (or `uri`) under
    the experiment `name`."""
    return write_params(root, tiny_params(
        name, train={"epochs": epochs, "beta_warmup_steps": 0, **(train or {})},
        sweep={"betas": list(betas), "max_failures": 0, **EVERY_EPOCH, "resources": {"cpu": 1},
               **sweep},
        tracking={"uri": uri or f"sqlite:///{db}"}))
