"""scikit-learn's bundled 8x8 digits, binarized and split with a fixed seed: a tiny set that
needs no download, for tests and quick runs."""
from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.metadata
import importlib.util
from pathlib import Path

import numpy as np

from ..loaders import binarized
from ..registry import DatasetSpec, DataSplits, LoadRequest, register

DIGITS_SPLIT = {"test": 360, "valid": 180}      # the rest (1,257) is train


def _bundled_csv() -> Path | None:
    """scikit-learn's own copy of the digits (sklearn/datasets/data/digits.csv.gz), found
    without importing scikit-learn: `import sklearn.datasets` costs ~1.8 CPU-s (SciPy) in every
    process that loads the digits, and a sweep's every trial worker does."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
    return path if path.is_file() else None


@functools.lru_cache(maxsize=1)
def _sklearn_digits() -> tuple[np.ndarray, np.ndarray, str]:
    """scikit-learn's bundled digits (images 8x8 with intensities 0..16, labels, version):
    the file `sklearn.datasets.load_digits` reads, read as it reads it (the same arrays,
    tests/test_data.py), else through `load_digits` itself; cached because training asks for
    the train and the test split separately."""
    path = _bundled_csv()
    if path is not None:
        with gzip.open(path, "rt") as f:
            data = np.loadtxt(f, delimiter=",")
        return (data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int, copy=False),
                importlib.metadata.version("scikit-learn"))
    import sklearn
    from sklearn.datasets import load_digits
    bunch = load_digits()
    return bunch.images, bunch.target, sklearn.__version__


def _load(spec: DatasetSpec, request: LoadRequest) -> DataSplits:
    raw_images, targets, version = _sklearn_digits()
    images = raw_images.astype(np.float64) / 16.0
    seed = request.seed
    order = np.random.default_rng(seed).permutation(len(images))
    n_test, n_valid = DIGITS_SPLIT["test"], DIGITS_SPLIT["valid"]
    index = {"test": order[:n_test], "valid": order[n_test:n_test + n_valid],
             "train": order[n_test + n_valid:]}
    parts = {split: (images[index[split]], targets[index[split]].astype(np.int64))
             for split in request.splits}
    digest = hashlib.sha256(np.ascontiguousarray(raw_images).tobytes()).hexdigest()
    return DataSplits("digits", f"digits: scikit-learn 8x8 digits, static binarization and "
                      f"split, seed {seed}", binarized(parts, seed), [], seed,
                      source=f"sklearn.datasets.load_digits (scikit-learn {version}, "
                             f"images sha256 {digest})")


DIGITS = register(DatasetSpec(name="digits", pretty="digits", loader=_load))
