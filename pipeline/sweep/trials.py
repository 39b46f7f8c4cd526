"""What a sweep trial is: its name, its grid point, its per-beta members, its TrainConfig and
provenance, and its row of results/sweep.csv (whose columns, statuses and file names are the
shared records, pipeline.records). The lowest module of the sweep: plain data and functions,
no Ray or MLflow, so that the trainables (in Ray workers), the MLflow tracker and the driver
all take these from here and each is defined once.
"""
from __future__ import annotations

import itertools
from dataclasses import fields

from echo.methods import method_options, resolved_options
from echo.metrics import EPOCH_METRICS
from echo.settings import TrainConfig
from pipeline.config import Params
from pipeline.records import OPTION_COLUMNS, PROVENANCE_SETTINGS, TrialStatus


def method_trial_options(base: dict, method: str, searched: dict) -> dict:
    """A trial's method options: params.yaml's for its method, then the searched ones; and one
    key per tunable-option column of the CSV / MLflow (None where the method lacks it)."""
    options = {**base["method_options"].get(method, {}),
               **{k: v for k, v in searched.items() if k in method_options(method)}}
    return {"options": options, **{column: options.get(column) for column in OPTION_COLUMNS}}


def train_config(config: dict) -> TrainConfig:
    """The `echo.train` settings of one per-beta trial config (`trial_base` + its grid point +
    its search): every TrainConfig field the config holds, as it holds it."""
    names = {f.name for f in fields(TrainConfig)} - {"method_options", "progress", "out"}
    return TrainConfig(**{name: config[name] for name in names if name in config},
                       method_options=dict(config.get("options", {})), progress=False)


def trial_provenance(config: dict) -> dict:
    """What one per-beta trial was trained with, each setting and option once: every
    provenance setting of its TrainConfig (`train_config`: the value it trained with, defaults
    included), then its method's options (the method's defaults, then params.yaml's and the
    searched ones, with the value the method's own rule picks where one is None, e.g. Echo's
    clipping factor solved for the batch: `echo.methods.resolved_options`).
    results/sweep.csv's setting columns and its MLflow child run's params."""
    cfg = train_config(config)
    return {**{name: getattr(cfg, name) for name in PROVENANCE_SETTINGS},
            **resolved_options(cfg.method, cfg.method_options, training=cfg)}



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


def member_outcome(status: str, error: str, metrics: dict) -> tuple[str, str]:
    """A member's own (status, error) within its trial's: a packed trial goes on when one
    member's loss turns non-finite, and reports that member's `member_<k>/status` and `/error`
    (`metrics` is the member's view of the result, `member_result`)."""
    if status == TrialStatus.COMPLETED and metrics.get("status") == TrialStatus.NONFINITE:
        return TrialStatus.NONFINITE, metrics.get("error", "")
    return status, error


def member_folder(member: dict) -> str:
    """Where a member's files are in its trial's checkpoint ("" for an unpacked trial)."""
    return f"member_{member['member']}" if "member" in member else ""


def trial_error_text(trial) -> str:
    """The last line of a crashed Tune trial's error (the exception), for MLflow and the CSV."""
    error = trial.get_error()
    text = str(error).strip() if error is not None else ""
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "trial failed (no error recorded)"


def csv_row(config: dict, metrics: dict, status: str, error: str, checkpoint: str) -> dict:
    """One CSV row (without its MLflow run id) of one per-beta trial: its provenance, its
    outcome and its last epoch's record (NaN for a value the record lacks)."""
    return {"trial_id": config["trial_id"], **trial_provenance(config),
            "status": status, "error": error,
            "epochs_done": int(metrics.get("epoch", 0)), "checkpoint": checkpoint,
            **{name: metrics.get(name, float("nan")) for name in EPOCH_METRICS}}
