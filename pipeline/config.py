"""The one validated schema of params.yaml. Every stage reads its settings through `load_params`.

Unknown keys and bad values fail before anything starts, with the field, the value and the
allowed range in the message.
"""
from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Literal

import torch
import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator,
                      model_validator)

from echo.data import DATASETS
from echo.device import DEVICE_TYPES
from echo.networks import LIKELIHOODS
from echo.methods import check_method_options, method_options, tunable_options
from pipeline.method_params import checked_options, known_method
from echo.metrics import EPOCH_METRICS
from echo.settings import RESUME_FREE, TrainConfig, default_of, sweep_wide_settings

PARAMS_FILE = "params.yaml"
# sweep.name is a folder name (<storage_path>/<name>) and MLflow run name: one path component
# of letters, digits and . _ - (no "/", "..", "@": <name>@<uid> is an archived sweep).
SWEEP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
# URI schemes MLflow's tracking store registry knows (a bare path is a file store); a typo such
# as `sqlit:///` would otherwise fail only once the sweep opens the store.
TRACKING_SCHEMES = ("file", "sqlite", "postgresql", "mysql", "mssql", "http", "https",
                    "databricks", "databricks-uc", "uc")


def free(default, **field):
    """A field that may change between runs of one sweep without changing what its trials are
    (where it runs, how often it checkpoints...): not part of the sweep's fingerprint
    (pipeline.sweep.experiment), which every other field of data:, train: and sweep: is. The same
    declaration as echo.settings' `resume_free` for the train: section."""
    return Field(default, json_schema_extra={RESUME_FREE: True}, **field)


def is_free(info) -> bool:
    """Whether a pydantic FieldInfo is declared `free`."""
    return bool((info.json_schema_extra or {}).get(RESUME_FREE))


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
    download: bool = free(True)             # fetch missing raw files from the official mirrors
    binarization_seed: int = Field(0, ge=0)  # static binarization seed, recorded in the manifest
    check_sizes: bool = free(True)          # raw files must have the canonical image counts

    @field_validator("dataset")
    @classmethod
    def known_dataset(cls, v: str) -> str:
        if v not in DATASETS:
            raise ValueError(f"unknown dataset {v!r}; choose one of {list(DATASETS)}")
        return v

    @property
    def prepared_path(self) -> Path:
        return Path(self.prepared_dir) / f"{self.dataset}.npz"


class TrainSettings(Strict):
    """The checks of `train:` beyond each field's bounds; the fields themselves are added by
    `TrainParams` below from echo.settings.TrainConfig (one definition, one default)."""

    @field_validator("device", check_fields=False)
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

    @field_validator("likelihood", check_fields=False)
    @classmethod
    def known_likelihood(cls, v):
        if v is not None and v not in LIKELIHOODS:
            raise ValueError(f"unknown likelihood {v!r}; choose one of {list(LIKELIHOODS)} or "
                             f"leave it out (the data set's own)")
        return v

    @model_validator(mode="before")
    @classmethod
    def moved_keys(cls, data):
        # Say where a setting went instead of "extra field".
        if isinstance(data, dict):
            if "seed" in data:
                raise ValueError(f"train.seed moved to sweep.seeds, a list of seeds (each grid "
                                 f"point is trained once per seed): write `sweep: {{seeds: "
                                 f"[{data['seed']}]}}` instead")
            for key in ("d_max", "replace"):
                if key in data:
                    raise ValueError(f"train.{key} is an option of the echo method now: write "
                                     f"`method_options: {{echo: {{{key}: {data[key]!r}}}}}`")
        return data


def _train_field(f):
    meta = f.metadata
    bounds = {k: meta[k] for k in ("ge", "gt", "le") if meta.get(k) is not None}
    extra = {"json_schema_extra": {RESUME_FREE: True}} if meta.get(RESUME_FREE) else {}
    return (typing.get_type_hints(TrainConfig)[f.name],
            Field(default_of(f), description=meta["help"], **bounds, **extra))


# params.yaml's train: section: the TrainConfig fields marked sweep-wide, with their defaults
# and bounds (echo/settings.py). A trial's TrainConfig is these plus its grid point.
TrainParams = create_model("TrainParams", __base__=TrainSettings,
                           **{f.name: _train_field(f) for f in sweep_wide_settings()})


class Range(Strict):
    low: float = Field(gt=0)
    high: float = Field(gt=0)

    @model_validator(mode="after")
    def ordered(self):
        if not self.low < self.high:
            raise ValueError(f"low={self.low} must be below high={self.high}")
        return self


class SearchParams(Strict):
    """Optuna (through Ray Tune) tunes these per grid point; without a range train.lr and the
    method's option (method_options, else its default) are used."""
    num_samples: int = Field(1, ge=1)
    lr: Range | None = None                # log-uniform, every method
    # Uniform ranges of a method's tunable options (echo.methods.tunable_options), e.g.
    # {echo: {clip_factor: {low: 0.5, high: 0.9}}}.
    method_options: dict[str, dict[str, Range]] = {}
    metric: str = "test_neg_elbo"         # minimised; test_loss = test D + beta * test R
    # Any train_/test_ value of the library's epoch record (echo.metrics.EPOCH_METRICS).
    METRICS: typing.ClassVar[tuple[str, ...]] = tuple(
        m for m in EPOCH_METRICS if m.startswith(("train_", "test_")))

    @model_validator(mode="before")
    @classmethod
    def clip_factor_moved(cls, data):
        if isinstance(data, dict) and "clip_factor" in data:
            raise ValueError("sweep.search.clip_factor moved to sweep.search.method_options."
                             "echo.clip_factor (each method's tunable options under its name)")
        return data

    @field_validator("method_options")
    @classmethod
    def tunable(cls, v: dict) -> dict:
        for method, ranges in v.items():
            known_method(method)
            allowed = tunable_options(method)
            bad = sorted(set(ranges) - set(allowed))
            if bad:
                raise ValueError(f"{method}: {bad} cannot be searched; its tunable options are "
                                 f"{list(allowed)}")
        return v

    @property
    def searched(self) -> bool:
        return self.lr is not None or any(self.method_options.values())

    @field_validator("metric")
    @classmethod
    def reported_metric(cls, v: str) -> str:
        allowed = list(cls.METRICS)
        if v not in allowed:
            raise ValueError(f"unknown metric {v!r}; choose one of {allowed}")
        return v


class ResourceParams(Strict):
    cpu: float = Field(1, gt=0)
    gpu: float = Field(0, ge=0)             # fractions let several small trials share one GPU


class SweepParams(Strict):
    # The experiment's folder and MLflow name: which sweep, not what its trials are.
    name: str = free("rd_sweep")

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
    # Where and how the trials run, not what they are: these may change on resume
    # (docs/sweep.md, "Resuming"; pipeline.sweep.run.apply_resume_knobs).
    resources: ResourceParams = free(ResourceParams())
    max_concurrent: int = free(2, ge=1)
    max_failures: int = free(2, ge=0)
    checkpoint_every: int = free(5, ge=1)
    # ...but not more often than this: a trial of many short epochs would otherwise spend its
    # time writing checkpoints (a crash loses at most max(checkpoint_every epochs, this)).
    checkpoint_min_interval_s: float = free(30.0, ge=0)
    storage_path: str = free("ray_results")
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
        if search.num_samples > 1 and not search.searched:
            raise ValueError(f"sweep.search.num_samples={search.num_samples} without a search "
                             f"range (search.lr or search.method_options) repeats identical "
                             f"trials; "
                             f"for replicates list seeds in sweep.seeds instead")
        return self

    @field_validator("methods")
    @classmethod
    def known_methods(cls, v: list[str]) -> list[str]:
        for method in v:
            known_method(method)
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
        if has_credentials(v):
            # It would be written to dvc.lock, the logs and Tune's pickled state.
            scheme = v.split(":", 1)[0].split("+", 1)[0].lower()
            where = ("set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or "
                     "MLFLOW_TRACKING_TOKEN) in the environment, where MLflow reads them"
                     if scheme in ("http", "https") else
                     "give the password to the database client outside params.yaml (e.g. "
                     "PGPASSWORD or ~/.pgpass for PostgreSQL, an option file for MySQL)")
            raise ValueError(f"tracking.uri embeds a user name or password ('user:password@'), "
                             f"which would be written to dvc.lock, logs and the sweep's files; "
                             f"remove it from the URI and {where}")
        if v.startswith("databricks"):
            scheme = v.split(":", 1)[0].lower()
        elif "://" in v:
            scheme = v.split(":", 1)[0].split("+", 1)[0].lower()
        else:
            # MLflow would read `localhost:5000` as scheme `localhost`, and a bare file name as a
            # folder store: neither is what was meant.
            hint = (f"http://{v}" if re.fullmatch(r"[\w.-]+:\d+(/.*)?", v.strip()) else
                    f"sqlite:///{v}" if v.strip().endswith((".db", ".sqlite", ".sqlite3")) else
                    f"file:///<absolute path of {v}>")
            raise ValueError(f"tracking.uri {v!r} is not a URI; write {hint} "
                             f"(schemes: {', '.join(TRACKING_SCHEMES)})")
        if not v.strip() or scheme not in TRACKING_SCHEMES:
            raise ValueError(f"tracking.uri {v!r} has an unknown scheme; use e.g. "
                             f"sqlite:///mlflow.db, http://127.0.0.1:5000 or file:///abs/folder "
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
    # Per-method options (echo.method_options(method)), e.g. {vae-vamp: {n_pseudo: 500},
    # echo: {d_max: 50}}; a method not listed uses its builder's defaults.
    method_options: dict[str, dict] = {}
    # Options that apply only when data.dataset is the named data set, over method_options
    # (e.g. the paper's VampPrior has 500 pseudo-inputs on Omniglot, 250 on the MNIST sets).
    dataset_method_options: dict[str, dict[str, dict]] = {}
    sweep: SweepParams = SweepParams()
    tracking: TrackingParams = TrackingParams()
    evaluate: EvaluateParams = EvaluateParams()
    frontier: FrontierParams = FrontierParams()

    @field_validator("method_options")
    @classmethod
    def known_options(cls, v: dict) -> dict:
        return checked_options(v, "method_options")

    @field_validator("dataset_method_options")
    @classmethod
    def known_dataset_options(cls, v: dict) -> dict:
        for dataset in v:
            if dataset not in DATASETS:
                raise ValueError(f"unknown dataset {dataset!r}; choose one of {list(DATASETS)}")
        return {dataset: checked_options(per_method or {}, f"dataset_method_options.{dataset}")
                for dataset, per_method in v.items()}

    def options_of(self, method: str) -> dict:
        """The options params.yaml gives `method` for this data set (its builder's defaults for
        the rest): method_options, then dataset_method_options of data.dataset."""
        for_dataset = self.dataset_method_options.get(self.data.dataset, {})
        return {**self.method_options.get(method, {}), **for_dataset.get(method, {})}

    @property
    def options(self) -> dict[str, dict]:
        """Every method's options as the trials use them (`options_of`), methods with none left
        out."""
        methods = set(self.method_options) | set(
            self.dataset_method_options.get(self.data.dataset, {}))
        return {m: self.options_of(m) for m in sorted(methods) if self.options_of(m)}

    @model_validator(mode="after")
    def method_rules(self):
        """Each method's own rules on its options (e.g. Echo's truncated sum must stay below
        float precision: d_max < batch size without replacement, and the clipping factor at
        most the solved r for that d_max), at both ends of every search range."""
        ranges = self.sweep.search.method_options
        for method in sorted(set(self.sweep.methods) | set(self.options) | set(ranges)):
            names = {**{o: f"method_options.{method}.{o}" for o in method_options(method)},
                     "batch_size": "train.batch_size"}
            searched = ranges.get(method, {})
            for end in ("low", "high"):
                values = {o: getattr(r, end) for o, r in searched.items()}
                check_method_options(method, {**self.options_of(method), **values},
                                     training=self.train,
                                     names={**names, **{o: f"sweep.search.method_options."
                                                           f"{method}.{o}.{end}"
                                                        for o in searched}})
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


_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/?#@\s'\"]*)@")


def has_credentials(uri: str) -> bool:
    """A URI with a user name or password before its host (`scheme://user:pw@host`)."""
    return bool(_USERINFO.search(uri))


def redact_credentials(text: str) -> str:
    """`text` with every URI's `user:password@` replaced by `***@`."""
    return _USERINFO.sub(lambda m: f"{m['scheme']}***@", text)


def format_validation_error(err: ValidationError) -> str:
    """One line per problem: field path, the value given and what is allowed."""
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        given = e.get("input")
        lines.append(f"{field}: {e['msg']} (got {redact_credentials(repr(given))})")
    return "; ".join(lines)
