"""The one validated schema of params.yaml. Every stage reads its settings through `load_params`.

Unknown keys and bad values fail before anything starts, with the field, the value and the
allowed range in the message.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from echo import METHODS
from echo.noise import check_echo_truncation   # the rule python -m echo.train uses too
from echo.data import DATASETS

PARAMS_FILE = "params.yaml"
MAX_EPOCHS = 1_000_000
DEVICE_TYPES = ("cpu", "cuda", "mps")
# sweep.name is a folder name (<storage_path>/<name>) and MLflow run name: one path component
# of letters, digits and . _ - (no "/", "..", "@": <name>@<uid> is an archived sweep).
SWEEP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
# URI schemes MLflow's tracking store registry knows (a bare path is a file store); a typo such
# as `sqlit:///` would otherwise fail only once the sweep opens the store.
TRACKING_SCHEMES = ("file", "sqlite", "postgresql", "mysql", "mssql", "http", "https",
                    "databricks", "databricks-uc", "uc")


class Strict(BaseModel):
    # allow_inf_nan=False: `.inf` / `.nan` in YAML would pass a `gt=0` bound (beta, cpu).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def no_booleans_as_numbers(cls, value, info):
        """YAML reads yes/no/on/off/true as booleans, which pydantic would quietly turn into 1/0
        (`epochs: yes` -> 1 epoch): outside a bool field a boolean is a typo, refuse it."""
        annotation = cls.model_fields[info.field_name].annotation
        if bool in (annotation, *getattr(annotation, "__args__", ())):
            return value
        if any(isinstance(item, bool) for item in (value if isinstance(value, list) else [value])):
            raise ValueError(f"a boolean is not allowed here, got {value!r}")
        return value


class DataParams(Strict):
    dataset: str = "digits"
    raw_dir: str = "data/raw"               # where raw files are (or are downloaded to)
    prepared_dir: str = "data/prepared"     # stages/prepare writes <dataset>.npz here
    download: bool = True                   # fetch missing raw files from the official mirrors
    binarization_seed: int = Field(0, ge=0)  # static binarization seed, recorded in the manifest
    check_sizes: bool = True                # raw files must have the canonical image counts

    @field_validator("dataset")
    @classmethod
    def known_dataset(cls, v: str) -> str:
        if v not in DATASETS:
            raise ValueError(f"unknown dataset {v!r}; choose one of {list(DATASETS)}")
        return v

    @property
    def prepared_path(self) -> Path:
        return Path(self.prepared_dir) / f"{self.dataset}.npz"


class TrainParams(Strict):
    # At most a million: a typo such as 1e20 would otherwise pass and fail only after start-up.
    epochs: int = Field(20, ge=1, le=MAX_EPOCHS)
    batch_size: int = Field(100, ge=2)
    lr: float = Field(3e-4, gt=0, le=1)
    lr_decay_start: float = Field(0.5, ge=0, le=1)
    # beta rises linearly from 0 over these steps (docs/methods.md); None: echo.train's default
    beta_warmup_steps: int | None = Field(None, ge=0)
    device: str = "auto"
    d_max: int | None = Field(None, ge=1)   # Echo terms; None: batch_size - 1
    replace: bool = False                   # Echo noise drawn with replacement
    cuda_graph: bool = True                 # replay each step as one CUDA graph (GPU trials)

    @field_validator("device")
    @classmethod
    def torch_device(cls, v: str) -> str:
        # Only the spelling here: whether this machine has the device is checked where the
        # device is used (the sweep, before anything starts), as evaluate may run elsewhere.
        if v != "auto":
            try:
                kind = torch.device(v).type
            except (RuntimeError, ValueError):
                kind = None
            if kind not in DEVICE_TYPES:
                raise ValueError(f"unknown device {v!r}; use auto, cpu, cuda, cuda:<index> or mps")
        return v

    @model_validator(mode="before")
    @classmethod
    def seed_moved(cls, data):
        # The seed became a sweep dimension (sweep.seeds); say so instead of "extra field".
        if isinstance(data, dict) and "seed" in data:
            raise ValueError(f"train.seed moved to sweep.seeds, a list of seeds (each grid point "
                             f"is trained once per seed): write `sweep: {{seeds: "
                             f"[{data['seed']}]}}` instead")
        return data


class Range(Strict):
    low: float = Field(gt=0)
    high: float = Field(gt=0)

    @model_validator(mode="after")
    def ordered(self):
        if not self.low < self.high:
            raise ValueError(f"low={self.low} must be below high={self.high}")
        return self


class SearchParams(Strict):
    """Optuna (through Ray Tune) tunes these per grid point; None keeps train.lr / the solved r."""
    num_samples: int = Field(1, ge=1)
    lr: Range | None = None
    clip_factor: Range | None = None
    metric: str = "test_neg_elbo"         # minimised; test_loss = test D + beta * test R

    @field_validator("metric")
    @classmethod
    def reported_metric(cls, v: str) -> str:
        allowed = [f"{split}_{name}" for split in ("test", "train")
                   for name in ("neg_elbo", "loss", "rate", "distortion")]
        if v not in allowed:
            raise ValueError(f"unknown metric {v!r}; choose one of {allowed}")
        return v


class ResourceParams(Strict):
    cpu: float = Field(1, gt=0)
    gpu: float = Field(0, ge=0)             # fractions let several small trials share one GPU


class SweepParams(Strict):
    name: str = "rd_sweep"

    @field_validator("name")
    @classmethod
    def one_path_component(cls, v: str) -> str:
        # `../data` would put the sweep's folder (and, after a params change, its archive
        # move) outside storage_path; "" would make storage_path itself the experiment.
        if not SWEEP_NAME.fullmatch(v) or ".." in v:
            raise ValueError(f"sweep.name must be one folder name (letters, digits, '.', '_', "
                             f"'-'; starting with a letter or digit; at most 100), got {v!r}")
        return v
    methods: list[str] = ["echo", "vae", "infovae"]
    betas: list[float] = [0.1, 0.3, 0.6, 1.0, 1.5, 3.0]
    archs: list[Literal["conv", "mlp"]] = ["mlp"]
    latent_dims: list[int] = [32]
    # Every grid point is trained once per seed (weights, data order, noise); the frontier stage
    # averages over seeds and gives each point's spread (docs/sweep.md, "Seeds").
    seeds: list[int] = [0]
    search: SearchParams = SearchParams()
    asha: bool = False
    # Train all `betas` of a (method, arch, latent_dim, Optuna sample) as one vectorised
    # ensemble in one trial (echo.ensemble.fit_ensemble): one process and one data load for
    # K betas, and on a GPU the K small models run side by side (CUDA streams) instead of
    # each leaving the chip idle. Results stay one row / MLflow run per beta.
    pack_betas: bool = False
    resources: ResourceParams = ResourceParams()
    max_concurrent: int = Field(2, ge=1)
    max_failures: int = Field(2, ge=0)
    checkpoint_every: int = Field(5, ge=1)
    # ...but not more often than this: a trial of many short epochs would otherwise spend its
    # time writing checkpoints (a crash loses at most max(checkpoint_every epochs, this)).
    checkpoint_min_interval_s: float = Field(30.0, ge=0)
    storage_path: str = "ray_results"
    train_limit: int | None = Field(None, ge=2)
    test_limit: int | None = Field(None, ge=2)

    @field_validator("methods", "betas", "archs", "latent_dims", "seeds")
    @classmethod
    def no_duplicates(cls, v: list) -> list:
        # Each grid point names one trial (e.g. echo_b0.3_mlp_z32): duplicates would collide.
        repeated = sorted({x for x in v if v.count(x) > 1}, key=str)
        if repeated:
            raise ValueError(f"values must be distinct, {repeated} repeated in {v}")
        return v

    @model_validator(mode="after")
    def packing_without_asha(self):
        # ASHA decides per trial; a packed trial holds every beta, so ASHA would stop all the
        # betas of a (method, arch, latent_dim) together, leaving holes in the R-D curve.
        if self.pack_betas and self.asha:
            raise ValueError("sweep.pack_betas and sweep.asha cannot both be true: ASHA would "
                             "stop all betas of a packed trial together; turn one of them off")
        return self

    @field_validator("seeds")
    @classmethod
    def valid_seeds(cls, v: list[int]) -> list[int]:
        if not v or any(seed < 0 for seed in v):
            raise ValueError(f"seeds must be a non-empty list of integers >= 0, got {v}")
        return v

    @model_validator(mode="after")
    def samples_need_a_search(self):
        # Repeated samples without a search range would be identical trials; replicates are
        # what sweep.seeds is for.
        search = self.search
        if search.num_samples > 1 and search.lr is None and search.clip_factor is None:
            raise ValueError(f"sweep.search.num_samples={search.num_samples} without a search "
                             f"range (search.lr or search.clip_factor) repeats identical trials; "
                             f"for replicates list seeds in sweep.seeds instead")
        return self

    @field_validator("methods")
    @classmethod
    def known_methods(cls, v: list[str]) -> list[str]:
        unknown = [m for m in v if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; choose from {sorted(METHODS)}")
        if not v:
            raise ValueError("at least one method is needed")
        return v

    @field_validator("betas")
    @classmethod
    def positive_betas(cls, v: list[float]) -> list[float]:
        bad = [b for b in v if not b > 0]
        if bad or not v:
            raise ValueError(f"betas must be a non-empty list of numbers > 0, got {v}")
        return v

    @field_validator("latent_dims")
    @classmethod
    def positive_dims(cls, v: list[int]) -> list[int]:
        if not v or any(d < 1 for d in v):
            raise ValueError(f"latent_dims must be a non-empty list of integers >= 1, got {v}")
        return v


class TrackingParams(Strict):
    uri: str = "sqlite:///mlflow.db"
    experiment: str = "echo-rd"

    @field_validator("uri")
    @classmethod
    def known_scheme(cls, v: str) -> str:
        scheme = v.split(":", 1)[0].split("+", 1)[0].lower() if "://" in v or v.startswith(
            "databricks") else ""
        if not v.strip() or (scheme and scheme not in TRACKING_SCHEMES):
            raise ValueError(f"tracking.uri {v!r} has an unknown scheme; use e.g. "
                             f"sqlite:///mlflow.db, http://127.0.0.1:5000 or a folder path "
                             f"(schemes: {', '.join(TRACKING_SCHEMES)})")
        return v

    @field_validator("experiment")
    @classmethod
    def experiment_named(cls, v: str) -> str:
        if not v.strip():
            raise ValueError(f"tracking.experiment must be a non-empty name, got {v!r}")
        return v


class EvaluateParams(Strict):
    iwae_k: int = Field(1000, ge=1)
    batch_size: int = Field(100, ge=2)
    test_limit: int | None = Field(None, ge=2)
    seed: int = 0                            # encoder noise at evaluation: same numbers each run


class FrontierParams(Strict):
    recon_samples: int = Field(10, ge=1)     # encoder samples averaged per reconstruction


class Params(Strict):
    data: DataParams = DataParams()
    train: TrainParams = TrainParams()
    sweep: SweepParams = SweepParams()
    tracking: TrackingParams = TrackingParams()
    evaluate: EvaluateParams = EvaluateParams()
    frontier: FrontierParams = FrontierParams()

    @model_validator(mode="after")
    def echo_sum_is_exact(self):
        """Echo's truncated sum must stay below float precision: d_max < batch size without
        replacement, and the clipping factor at most the solved r for that d_max."""
        clip = self.sweep.search.clip_factor
        check_echo_truncation(self.train.batch_size, self.train.d_max, self.train.replace,
                              clip.high if clip is not None else None,
                              names={"d_max": "train.d_max", "batch_size": "train.batch_size",
                                     "clip_factor": "sweep.search.clip_factor.high"})
        return self


class ParamsError(ValueError):
    """params.yaml is missing, unparsable or invalid; the message names file and field."""


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: not found; run from the project root or pass --params")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, UnicodeDecodeError) as err:
        raise ParamsError(f"{path}: cannot be read ({err}); fix or restore the file") from err
    except yaml.YAMLError as err:
        # One line: PyYAML's own message spans several lines with a caret diagram.
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ParamsError(f"{path}: not valid YAML{where}: {problem}") from err
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(f"{path}: " + format_validation_error(err)) from None


def format_validation_error(err: ValidationError) -> str:
    """One line per problem: field path, the value given and what is allowed."""
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        given = e.get("input")
        lines.append(f"{field}: {e['msg']} (got {given!r})")
    return "; ".join(lines)
