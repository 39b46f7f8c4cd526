"""Omniglot: Burda et al.'s 28x28 split (chardata.mat, 24,345 train / 8,070 test, 50
alphabets), statically binarized. The split has no validation set: `valid` is empty."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..fetching import locate
from ..loaders import binarized
from ..readers import IMAGE_SIDE, read_chardata
from ..registry import DatasetSpec, DataSplits, LoadRequest, register


def read_omniglot_mat(path: Path, check_sizes: bool = True
                      ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Burda et al.'s chardata.mat as {"train"/"test": (intensities [N, 28, 28], labels [N])},
    its image counts checked against the canonical file's unless check_sizes=False."""
    return read_chardata(path, OMNIGLOT.sizes if check_sizes else None)


def _load(spec: DatasetSpec, request: LoadRequest) -> DataSplits:
    path = locate(spec, request.root, request.download)["chardata.mat"]
    parts = read_chardata(path, request.expected_sizes(spec) or None)
    empty = (np.zeros((0, IMAGE_SIDE, IMAGE_SIDE)), np.zeros(0, dtype=np.int64))
    # Burda's split has no validation set: `valid` is empty.
    parts = {split: parts.get(split, empty) for split in request.splits}
    return DataSplits("omniglot", f"omniglot: Burda et al. 28x28 chardata.mat, static "
                      f"binarization, seed {request.seed}", binarized(parts, request.seed),
                      [path], request.seed)


OMNIGLOT = register(DatasetSpec(
    name="omniglot", pretty="Omniglot", loader=_load,
    files={"chardata.mat": None},                   # no published checksum
    sizes={"train": 24_345, "test": 8_070},
    mirrors=("https://raw.githubusercontent.com/yburda/iwae/master/datasets/OMNIGLOT/",),
    search_dirs=("omniglot", ""),
))
