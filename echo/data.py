"""In-memory data sets as float tensors [N, C, H, W] in [0, 1] (binary for the binary sets).

Minimal layer for the core library: MNIST from the canonical IDX files, a static binarization
of it, and scikit-learn's bundled digits (no download). The data layer issue extends this.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

SPLITS = ("train", "valid", "test")
BINARIZATION_SEED = 0
DATA_ROOT_ENV = "ECHO_DATA_ROOT"

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class DataError(ValueError):
    """A missing or malformed data file; the message names the file and the fix."""


def default_root() -> Path:
    return Path(os.environ.get(DATA_ROOT_ENV, "data/raw"))


def _find(root: Path, stem: str) -> Path:
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.exists():
            return candidate
    raise DataError(f"missing {root / stem}(.gz): place the canonical MNIST IDX files in {root} "
                    f"or set {DATA_ROOT_ENV}")


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) and check its header against its length."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as err:
        raise DataError(f"{path}: cannot read ({err}); re-download the file") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise DataError(f"{path}: expected {expected} bytes for shape {dims}, found {len(raw)}; "
                        f"the file is truncated or corrupt")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _mnist(root: Path, split: str) -> tuple[Tensor, Tensor]:
    part = "test" if split == "test" else "train"
    images = read_idx(_find(root, _IDX_FILES[part][0]))
    labels = read_idx(_find(root, _IDX_FILES[part][1]))
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    if split == "train":        # 50k/10k train/valid as in the binary MNIST literature
        return x[:50_000], y[:50_000]
    if split == "valid":
        return x[50_000:], y[50_000:]
    return x, y


def _binarize(x: Tensor, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.bernoulli(x, generator=generator)


def _digits(split: str) -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits
    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(BINARIZATION_SEED))
    x = _binarize(x, BINARIZATION_SEED)[order]
    y = y[order]
    n_test, n_valid = 360, 180
    parts = {"test": slice(0, n_test), "valid": slice(n_test, n_test + n_valid),
             "train": slice(n_test + n_valid, None)}
    return x[parts[split]], y[parts[split]]


DATASETS = ("binary_mnist", "mnist", "digits")


def load_dataset(name: str, split: str = "train", root: str | Path | None = None
                 ) -> tuple[Tensor, Tensor]:
    """(images [N, C, H, W] float32, labels [N] int64) of a data set split."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = Path(root) if root is not None else default_root()
    if name == "mnist":
        return _mnist(root, split)
    if name == "binary_mnist":
        # Static binarization: one fixed Bernoulli draw per split (seed recorded in metadata).
        x, y = _mnist(root, split)
        return _binarize(x, BINARIZATION_SEED + SPLITS.index(split)), y
    if name == "digits":
        return _digits(split)
    raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")


def load_prepared(path: str | Path, split: str) -> tuple[Tensor, Tensor]:
    """A split of a prepared data set: arrays `<split>_x` [N, C, H, W] and `<split>_y` [N]."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"missing prepared data {path}: run `python -m stages.prepare` first")
    with np.load(path) as npz:
        if f"{split}_x" not in npz:
            raise DataError(f"{path} has no split {split!r} (arrays: {sorted(npz.files)})")
        return (torch.from_numpy(npz[f"{split}_x"].astype(np.float32)),
                torch.from_numpy(npz[f"{split}_y"].astype(np.int64)))
