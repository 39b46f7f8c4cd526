"""The training settings of one run: each defined once, here, with its default, its bounds and its
help text. Everything else is derived from these fields:

- `TrainConfig.__post_init__` checks the bounds (one line naming the field);
- `python -m echo.train` has one flag per field (`add_arguments` / `from_arguments`);
- params.yaml's `train:` section is the fields marked `SWEEP_WIDE` (pipeline/config.py builds
  its schema from them), so params.yaml, the schema and the CLI cannot disagree;
- a field marked `RESUME_FREE` changes where or how fast a run trains, not what it trains: it
  may change when a run resumes (benchmarks.fidelity) or a stored sweep is run again, and it is
  not part of the sweep's fingerprint (pipeline.sweep.experiment) -- every other field is, but only
  where it differs from its default, so a new field does not archive stored sweeps;
- a field marked `LOCAL` says where this machine keeps files or how it shows progress: it is
  no part of a run's provenance (the settings sweep.csv and MLflow record for each trial).

Adding a training setting is adding one field below (docs/howto.md).
"""
from __future__ import annotations

import argparse
import json
import math
import typing
from dataclasses import MISSING, dataclass, field, fields

from .networks import LIKELIHOODS

# Why a warm-up of beta at all, and why this length: docs/methods.md, "Why the conv models did
# not learn". 500 steps: one of the paper's 200 epochs (the first 0.5% of its training).
BETA_WARMUP_STEPS = 500
MAX_EPOCHS = 1_000_000      # a typo such as 1e20 would otherwise pass and fail only much later

SWEEP_WIDE = "sweep_wide"   # metadata key: the setting is shared by every trial (params.yaml train:)
RESUME_FREE = "resume_free"  # metadata key: may change on resume; the results do not depend on it
LOCAL = "local"             # metadata key: a path or display choice of this machine, no provenance


def setting(default, help: str, *, ge=None, gt=None, le=None, sweep_wide: bool = False,
            resume_free: bool = False, local: bool = False, why: str = "", factory=None):
    """A TrainConfig field: its default, bounds (checked for numbers), help, whether params.yaml's
    `train:` section sets it for a whole sweep, whether it may change on resume without changing
    the results (`resume_free`), and whether it is local to this machine (`local`: implies
    resume_free)."""
    metadata = {"help": help, "ge": ge, "gt": gt, "le": le, SWEEP_WIDE: sweep_wide,
                RESUME_FREE: resume_free or local, LOCAL: local, "why": why}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """One run: which model, which data, and how it is trained (the paper's recipe, App. B:
    Adam 3e-4, batch 100, lr constant for the first half and then linearly to 0)."""
    method: str = setting("echo", "the method (echo.METHODS)")
    dataset: str = setting("binary_mnist", "the data set (echo.data.DATASETS)")
    data_root: str | None = setting(None, "raw data folder; None: $ECHO_DATA_ROOT or data/raw",
                                    local=True)
    prepared: str | None = setting(None, "a .npz written by stages/prepare (else raw files)",
                                   local=True)
    arch: str = setting("conv", "network: conv (the paper's) or mlp")
    latent_dim: int = setting(32, "number of latent dimensions", ge=1)
    beta: float = setting(1.0, "weight of the rate in the loss D + beta R", ge=0)
    epochs: int = setting(200, "passes over the training set", ge=1, le=MAX_EPOCHS,
                          sweep_wide=True)
    batch_size: int = setting(100, "examples per step", ge=2, sweep_wide=True,
                              why="Echo noise uses the other examples")
    lr: float = setting(3e-4, "Adam's learning rate", gt=0, le=1, sweep_wide=True)
    lr_decay_start: float = setting(0.5, "fraction of training after which lr decays linearly "
                                    "to 0", ge=0, le=1, sweep_wide=True)
    beta_warmup_steps: int = setting(BETA_WARMUP_STEPS, "beta rises linearly from 0 over these "
                                     "steps (0: off; docs/methods.md)", ge=0, sweep_wide=True)
    seed: int = setting(0, "seed of weights, batch order and noise", ge=0)
    device: str = setting("auto", "auto, cpu, cuda, cuda:<index> or mps", sweep_wide=True,
                          resume_free=True)
    likelihood: str | None = setting(None, "the decoder's likelihood: bernoulli or gaussian "
                                     "(None: the data set's own, echo.data.dataset_spec(name)"
                                     ".likelihood)", sweep_wide=True)
    gaussian_tau: float | None = setting(None, "the gaussian decoder's fixed std tau (None: the "
                                         "data set's, else 1)", gt=0, sweep_wide=True)
    train_limit: int | None = setting(None, "use only the first N training examples", ge=2)
    test_limit: int | None = setting(None, "use only the first N test examples", ge=2)
    method_options: dict = setting(None, "method option key=value, e.g. clip_factor=0.8 "
                                   "(repeatable)", factory=dict)
    out: str | None = setting(None, "folder for metrics.json and checkpoint.pt", local=True)
    progress: bool = setting(True, "show a progress bar", local=True)
    compile: bool = setting(False, "torch.compile the training step on CUDA (eager elsewhere)",
                            resume_free=True)
    cuda_graph: bool = setting(True, "on CUDA, replay each training step as one CUDA graph "
                               "(off: launch every kernel from Python, for steps that sync "
                               "the host)", sweep_wide=True, resume_free=True)
    # Per member: an ensemble's members are clipped each by its own gradient norm, as K
    # separate runs would be (echo.loop.clip_member_grads_).
    grad_clip: float | None = setting(None, "clip the gradient to this L2 norm before each "
                                      "Adam step (None: off)", gt=0, sweep_wide=True)

    def __post_init__(self):
        hints = typing.get_type_hints(TrainConfig)
        for f in fields(self):
            check_setting(f.name, getattr(self, f.name), hints[f.name], f.metadata)
        if self.likelihood is not None and self.likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {list(LIKELIHOODS)} or None (the data "
                             f"set's own), got {self.likelihood!r}")


def check_setting(name: str, value, hint, meta) -> None:
    """The bounds of one numeric field, one line naming it (`epochs must be an integer >= 1`)."""
    kind = _base_type(hint)
    if kind not in (int, float) or (value is None and _optional(hint)):
        return
    is_number = not isinstance(value, bool) and isinstance(value, (int, float) if kind is float
                                                                  else int)
    if not is_number or (kind is float and not math.isfinite(value)):
        raise ValueError(f"{name} must be {'an integer' if kind is int else 'a finite number'}"
                         f"{_bounds_text(meta)}, got {value!r}")
    ge, gt, le = meta.get("ge"), meta.get("gt"), meta.get("le")
    if (ge is not None and value < ge) or (gt is not None and value <= gt) or \
            (le is not None and value > le):
        why = f": {meta['why']}" if meta.get("why") else ""
        raise ValueError(f"{name} must be {'an integer' if kind is int else 'a number'}"
                         f"{_bounds_text(meta)}{why}, got {value!r}")


def _bounds_text(meta) -> str:
    parts = [f"{op} {meta[key]}" for key, op in (("ge", ">="), ("gt", ">"), ("le", "<="))
             if meta.get(key) is not None]
    return " " + " and ".join(parts) if parts else ""


def _optional(hint) -> bool:
    return type(None) in typing.get_args(hint)


def _base_type(hint):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def sweep_wide_settings() -> list:
    """The fields params.yaml's `train:` section sets for a whole sweep (dataclass Fields)."""
    return [f for f in fields(TrainConfig) if f.metadata.get(SWEEP_WIDE)]


def default_of(f):
    return f.default_factory() if f.default is MISSING else f.default


def resume_free_settings() -> tuple[str, ...]:
    """The fields that may change on resume without changing the results (`resume_free`)."""
    return tuple(f.name for f in fields(TrainConfig) if f.metadata.get(RESUME_FREE))


def provenance_settings() -> tuple[str, ...]:
    """The fields that make up a run's provenance: all but the local ones and method_options,
    whose entries are recorded one by one."""
    return tuple(f.name for f in fields(TrainConfig)
                 if not f.metadata.get(LOCAL) and f.name != "method_options")


# -- the command line: one flag per field --------------------------------------------------
def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def parse_option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--option expects key=value, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, default and help from the field; a boolean that is on by
    default becomes `--no-<name>`, one that is off `--<name>`; method_options is `--option`."""
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        kind, help_text, default = _base_type(hints[f.name]), f.metadata["help"], default_of(f)
        if f.name == "method_options":
            parser.add_argument("--option", dest=f.name, type=parse_option, action="append",
                                default=[], help=help_text)
        elif kind is bool:
            flag = _flag(("no_" if default else "") + f.name)
            parser.add_argument(flag, dest=f.name, action="store_false" if default else
                                "store_true", help=help_text)
        else:
            parser.add_argument(_flag(f.name), dest=f.name, type=kind, default=default,
                                help=f"{help_text} (default {default})")


def from_arguments(args: argparse.Namespace) -> TrainConfig:
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
    values["method_options"] = dict(values["method_options"])
    return TrainConfig(**values)
