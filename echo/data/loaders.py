"""Loaders shared by data sets of one raw format, for a `DatasetSpec.loader`.

MNIST-format IDX sets (MNIST, Fashion-MNIST, and any set published as the same four files):
train = the training file less its last sixth, valid = that last sixth (10,000 of 60,000, the
binary MNIST literature's split), test = the test file."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .binarization import split_seed, binarize
from .fetching import locate
from .readers import read_idx_pair
from .registry import DatasetSpec, DataSplits, LoadRequest

# The four files of an MNIST-format set; its spec's `files` names them with .gz (`idx_files`).
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def idx_files(md5s: tuple[str | None, str | None, str | None, str | None]) -> dict[str, str | None]:
    """A spec's `files` for an MNIST-format set: the four .gz names with their published md5s."""
    return dict(zip((f + ".gz" for f in IDX_FILES), md5s))


def read_idx_splits(spec: DatasetSpec, request: LoadRequest
                    ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[Path]]:
    """({split: (images [N, 28, 28] uint8, labels [N] int64)}, the raw files read) for the
    requested splits of an MNIST-format set."""
    found = locate(spec, request.root, request.download)
    files = [found[name + ".gz"] for name in IDX_FILES]
    sizes = request.expected_sizes(spec)
    parts, used = {}, []
    if {"train", "valid"} & set(request.splits):
        images, labels = read_idx_pair(files[0], files[1], sizes.get("train"))
        used += files[:2]
        cut = len(images) - len(images) // 6
        parts["train"] = (images[:cut], labels[:cut])
        parts["valid"] = (images[cut:], labels[cut:])
    if "test" in request.splits:
        parts["test"] = read_idx_pair(files[2], files[3], sizes.get("test"))
        used += files[2:]
    return {split: parts[split] for split in request.splits}, used


def idx_grey_levels(spec: DatasetSpec, request: LoadRequest) -> DataSplits:
    """The loader of an MNIST-format set kept in grey levels: float32 [N, 1, 28, 28] in [0, 1]."""
    parts, used = read_idx_splits(spec, request)
    splits = {split: ((images.astype(np.float32) / 255.0)[:, None], labels)
              for split, (images, labels) in parts.items()}
    return DataSplits(spec.name, f"{spec.name}: {spec.pretty} grey levels in [0, 1] from the "
                      f"IDX files", splits, used, None)


def binarized(parts: dict[str, tuple[np.ndarray, np.ndarray]], seed: int, *, scale: float = 1.0
              ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each split's images [N, H, W] (intensities up to `scale`) statically binarized with its
    split seed, as uint8 [N, 1, H, W]; labels unchanged."""
    return {split: (binarize(images, split_seed(seed, split), scale=scale)[:, None], labels)
            for split, (images, labels) in parts.items()}
