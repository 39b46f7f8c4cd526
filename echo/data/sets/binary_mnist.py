"""Binary MNIST: Larochelle & Murray's static binarization (binarized_mnist_{train,valid,test}
.amat), the paper's data, when those files are present or downloadable; otherwise a static
binarization of MNIST with a fixed seed, announced in a warning and in `DataSplits.variant`."""
from __future__ import annotations

import logging

import numpy as np

from ..binarization import SPLITS
from ..errors import DataError
from ..fetching import download, find_raw_files, search_dirs
from ..loaders import binarized, read_idx_splits
from ..readers import IMAGE_SIDE, read_amat
from ..registry import DatasetSpec, DataSplits, LoadRequest, dataset_spec, register

log = logging.getLogger("echo.data")


def _load(spec: DatasetSpec, request: LoadRequest) -> DataSplits:
    root = request.root
    files = find_raw_files(spec, root)
    if files is None and request.download:
        try:
            download(spec, root)
            files = find_raw_files(spec, root)
        except DataError as err:
            log.warning("binary_mnist: could not download the Larochelle & Murray .amat files (%s)",
                        err)
    if files is None:
        return _binarized_mnist(request)
    result, used = {}, []
    for split in request.splits:
        path = files[f"binarized_mnist_{split}.amat"]
        x = read_amat(path, request.expected_sizes(spec).get(split))
        x = x.reshape(-1, 1, IMAGE_SIDE, IMAGE_SIDE)
        result[split] = (x, np.full(len(x), -1, dtype=np.int64))   # the .amat files carry no labels
        used.append(path)
    return DataSplits("binary_mnist", "binary_mnist: Larochelle & Murray static binarization "
                      "(.amat files)", result, used, None)


def _binarized_mnist(request: LoadRequest) -> DataSplits:
    """The fallback: MNIST's grey levels binarized with the request's seed."""
    seed, folders = request.seed, search_dirs(BINARY_MNIST, request.root)
    log.warning("binary_mnist: binarized_mnist_{train,valid,test}.amat not in %s; using a "
                "static binarization of MNIST with seed %d instead (not the paper's exact data)",
                " or ".join(map(str, folders)), seed)
    try:
        parts, used = read_idx_splits(dataset_spec("mnist"), request)
    except DataError as err:
        raise DataError(f"binary_mnist: no binarized_mnist_{{train,valid,test}}.amat in "
                        f"{' or '.join(f'{d}/' for d in folders)}, and no MNIST to binarize: {err}",
                        **err.arguments) from None
    return DataSplits("binary_mnist", f"binary_mnist: static binarization of MNIST, seed {seed}",
                      binarized(parts, seed, scale=255.0), used, seed)


BINARY_MNIST = register(DatasetSpec(
    name="binary_mnist", pretty="binary MNIST", loader=_load,
    files={f"binarized_mnist_{s}.amat": None for s in SPLITS},    # no published md5s
    # sha256 of each file as TensorFlow Datasets records it for the same mirror
    # (tensorflow_datasets/datasets/binarized_mnist/checksums.tsv, 4.9.10): plain text files,
    # so the content digest is the file's.
    sha256={
        "binarized_mnist_train.amat":
            "ad693b29f94c14277b095f5238ddefbbdaaae0939789dd2f4f0205278cee3e4d",
        "binarized_mnist_valid.amat":
            "1de3d397c40fe8eeb33dafd4099a1f665ec01e96d9be234aaeeac8a34930e2e2",
        "binarized_mnist_test.amat":
            "e6687bfea3f820c174f33b7865140b2a2dd2930ef786f35d45795fc193b5ab2c",
    },
    sizes={"train": 50_000, "valid": 10_000, "test": 10_000},
    mirrors=("http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/",),
    search_dirs=("binary_mnist", ""),
))
