"""The registry of data sets: one `DatasetSpec` per data set (its raw files and checksums,
canonical sizes, mirrors, where its files may sit, and its loader), and the two entry points
that look a data set up in it, `load_splits` and `load_dataset`.

Each module of `echo/data/sets/` registers its data set's spec when it is imported (the package
imports them all), so adding a data set is adding one file there (see docs/data.md)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch
from torch import Tensor

from .binarization import BINARIZATION_SEED, SPLITS
from .errors import DataError

DATA_ROOT_ENV = "ECHO_DATA_ROOT"


@dataclass
class DataSplits:
    """The splits of a data set as numpy arrays, with where they came from."""
    name: str
    variant: str                                   # which data exactly, in words
    splits: dict[str, tuple[np.ndarray, np.ndarray]]   # split -> (x [N,C,H,W] uint8|float32, y [N])
    raw_files: list[Path] = field(default_factory=list)
    binarization_seed: int | None = None
    source: str | None = None                      # where data without raw files came from
    spec: dict | None = None                       # a generated source's spec (known_answer)


@dataclass(frozen=True)
class LoadRequest:
    """What a caller of `load_splits` asked for, as a loader receives it."""
    root: Path                   # the raw-data folder (`root=`)
    splits: tuple[str, ...]      # a subset of SPLITS
    download: bool               # fetch missing raw files (`download=`)
    check_sizes: bool            # raw files must have the canonical image counts (`check_sizes=`)
    seed: int                    # the binarization (and digits' split) seed (`seed=`)

    def expected_sizes(self, spec: DatasetSpec) -> Mapping[str, int]:
        """The canonical image count of each raw part, or nothing when sizes are not checked."""
        return spec.sizes if self.check_sizes else {}


Loader = Callable[["DatasetSpec", LoadRequest], DataSplits]


@dataclass(frozen=True)
class DatasetSpec:
    """Everything the data layer knows about one data set."""
    name: str                    # the name `load_dataset(name)` takes
    pretty: str                  # how prose names it ("Fashion-MNIST")
    loader: Loader               # reads the requested splits (finding or fetching raw files)
    # Published raw file name -> md5 of the file as the mirrors serve it (None: no published
    # checksum; such files are verified by their format and `sizes`, and their sha256 goes into
    # the manifest).
    files: Mapping[str, str | None] = field(default_factory=dict)
    # Raw file name -> sha256 of its content (a .gz file's decompressed bytes, which do not
    # change when a mirror re-compresses), checked on every download before md5
    # (echo.data.fetching.content_digest). A file with neither checksum is never downloaded.
    sha256: Mapping[str, str] = field(default_factory=dict)
    # Image count of each raw part ("train", "valid", "test"), checked unless check_sizes=False.
    sizes: Mapping[str, int] = field(default_factory=dict)
    mirrors: tuple[str, ...] = ()        # base URLs serving `files`, tried in order
    # Folders under root that may hold `files` ("" is root itself); the first holding all of
    # them wins, and downloads go into the first.
    search_dirs: tuple[str, ...] = ()
    # The torchvision.datasets class of the set: files already in its layout (root/<class>/raw)
    # are found through `search_dirs`; downloads go through `mirrors` only, verified.
    torchvision: str | None = None
    # The decoder's likelihood p(x|z) the data set asks for (echo.networks.LIKELIHOODS) and,
    # for "gaussian", its fixed std tau (None: echo.networks.DEFAULT_TAU); a run may override
    # both (TrainConfig.likelihood, .gaussian_tau).
    likelihood: str = "bernoulli"
    tau: float | None = None
    # A source whose rate-distortion function is known: () -> its spec, a JSON-able dict with
    # "rd": {"kind": "log_loss", "entropy": H(X)} or {"kind": "gaussian_mse", "variances":
    # [...]} (echo.known_answer turns it into the curve); recorded in the manifest.
    known_answer: Callable[[], dict] | None = None


REGISTRY: dict[str, DatasetSpec] = {}


def register(spec: DatasetSpec) -> DatasetSpec:
    """Add a data set to the registry (once per name); returns the spec."""
    if spec.name in REGISTRY:
        raise ValueError(f"data set {spec.name!r} is registered twice; rename one")
    REGISTRY[spec.name] = spec
    return spec


def dataset_names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def dataset_spec(name: str) -> DatasetSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise DataError(f"unknown dataset {name!r}; choose one of {list(REGISTRY)}") from None


def default_root() -> Path:
    return Path(os.environ.get(DATA_ROOT_ENV, "data/raw"))


def load_splits(name: str, root: str | Path | None = None, splits=SPLITS, *,
                download: bool = False, seed: int = BINARIZATION_SEED,
                check_sizes: bool = True) -> DataSplits:
    """The requested splits of a data set as numpy arrays, with provenance for the manifest."""
    spec = dataset_spec(name)
    bad = [s for s in splits if s not in SPLITS]
    if bad:
        raise ValueError(f"split must be one of {SPLITS}, got {bad[0]!r}")
    root = Path(root) if root is not None else default_root()
    return spec.loader(spec, LoadRequest(root, tuple(splits), download, check_sizes, seed))


def load_dataset(name: str, split: str = "train", root: str | Path | None = None, *,
                 download: bool = False, seed: int = BINARIZATION_SEED, check_sizes: bool = True
                 ) -> tuple[Tensor, Tensor]:
    """(images [N, C, H, W] float32 in [0, 1], labels [N] int64; -1 where the data has none)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if name not in REGISTRY:
        raise ValueError(f"unknown dataset {name!r}; choose one of {dataset_names()}")
    x, y = load_splits(name, root, (split,), download=download, seed=seed,
                       check_sizes=check_sizes).splits[split]
    return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y)
