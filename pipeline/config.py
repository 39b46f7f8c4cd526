"""The one validated schema of params.yaml. Every stage reads its settings through `load_params`.

Unknown keys and bad values fail before anything starts, with the field, the value and the
allowed range in the message.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from echo import METHODS, clip_factor as solve_clip_factor
from echo.data import DATASETS
from echo.networks import ARCHITECTURES

PARAMS_FILE = "params.yaml"


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
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(100, ge=2)
    lr: float = Field(3e-4, gt=0, le=1)
    lr_decay_start: float = Field(0.5, ge=0, le=1)
    # beta rises linearly from 0 over these steps (docs/methods.md); None: echo.train's default
    beta_warmup_steps: int | None = Field(None, ge=0)
    seed: int = 0
    device: str = "auto"
    d_max: int | None = Field(None, ge=1)   # Echo terms; None: batch_size - 1
    replace: bool = False                   # Echo noise drawn with replacement
    cuda_graph: bool = True                 # replay each step as one CUDA graph (GPU trials)


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
    methods: list[str] = ["echo", "vae", "infovae"]
    betas: list[float] = [0.1, 0.3, 0.6, 1.0, 1.5, 3.0]
    archs: list[Literal["conv", "mlp"]] = ["mlp"]
    latent_dims: list[int] = [32]
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

    @field_validator("methods", "betas", "archs", "latent_dims")
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
        d_max = self.train.d_max if self.train.d_max is not None else self.train.batch_size - 1
        if not self.train.replace and d_max >= self.train.batch_size:
            raise ValueError(f"train.d_max={d_max} must be < train.batch_size="
                             f"{self.train.batch_size} without replacement")
        r_max = solve_clip_factor(d_max)
        clip = self.sweep.search.clip_factor
        if clip is not None and clip.high > r_max:
            raise ValueError(f"sweep.search.clip_factor.high={clip.high} exceeds {r_max:.4f}, the "
                             f"largest clipping factor whose truncated Echo tail stays below "
                             f"float32 precision with d_max={d_max}; allowed range (0, {r_max:.4f}]")
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
