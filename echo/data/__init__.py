"""Data sets as float tensors [N, C, H, W] in [0, 1], read from their raw formats, and the
prepared `.npz` + manifest that the pipeline's first stage writes and later stages verify.

Data sets (the paper's three plus two conveniences), one module each in `sets/`:
- `binary_mnist`: Larochelle & Murray's static binarization (`binarized_mnist_{train,valid,test}.amat`)
  when those files are present (or downloadable); otherwise a static binarization of MNIST with a
  fixed seed. The variant used is named in `DataSplits.variant` and in the manifest.
- `mnist`, `fashion_mnist`: grey levels from the canonical IDX files; train = first 50,000 of the
  training file, valid = its last 10,000, test = the 10,000 test images.
- `omniglot`: Burda et al.'s 28x28 split (`chardata.mat`, 24,345 train / 8,070 test, 50 alphabets),
  statically binarized. The split has no validation set: `valid` is empty.
- `digits`: scikit-learn's bundled 8x8 digits, binarized and split with a fixed seed (no download).

Modules: `registry` (one `DatasetSpec` per data set: files, checksums, sizes, mirrors, search
folders, loader; `load_splits`, `load_dataset`), `readers` (IDX, .amat, chardata.mat),
`binarization`, `fetching` (finding raw files under `root`, downloads), `loaders` (shared by the
MNIST-format sets), `prepared` (the .npz + manifest), `errors` (`DataError`).

Raw files sit under `root` (default `$ECHO_DATA_ROOT` or `data/raw`) in the folders each spec's
`search_dirs` names, first complete match wins (docs/data.md lists them). Every check that fails
raises `DataError` with one line naming the file and what was expected.
"""
from ..files import file_digest
from . import sets  # registers every data set (and so is in __all__)
from .binarization import BINARIZATION_RULE, BINARIZATION_SEED, SPLITS, binarize, split_seed
from .errors import DataError
from .fetching import download, fetch, fetch_all, find_raw_files, locate, search_dirs
from .loaders import IDX_FILES, idx_files, idx_grey_levels, read_idx_splits
from .prepared import MANIFEST_VERSION, check_prepared, load_prepared, manifest_path, prepare
from .readers import (IMAGE_SIDE, PIXELS, omniglot_images, read_amat, read_chardata, read_idx,
                      read_idx_pair)
from .registry import (DATA_ROOT_ENV, REGISTRY, DataSplits, DatasetSpec, LoadRequest,
                       dataset_names, dataset_spec, default_root, load_dataset, load_splits,
                       register)
from .sets.digits import DIGITS_SPLIT
from .sets.omniglot import read_omniglot_mat

DATASETS = dataset_names()      # every registered data set, in the order sets/ registers them

__all__ = [
    "BINARIZATION_RULE", "BINARIZATION_SEED", "DATASETS", "DATA_ROOT_ENV", "DIGITS_SPLIT",
    "IDX_FILES", "IMAGE_SIDE", "MANIFEST_VERSION", "PIXELS", "REGISTRY", "SPLITS", "DataError",
    "DataSplits", "DatasetSpec", "LoadRequest", "binarize", "check_prepared", "dataset_names",
    "dataset_spec", "default_root", "download", "fetch", "fetch_all", "file_digest",
    "find_raw_files", "idx_files", "idx_grey_levels", "load_dataset", "load_prepared",
    "load_splits", "locate", "manifest_path", "omniglot_images", "prepare", "read_amat",
    "read_chardata", "read_idx", "read_idx_pair", "read_idx_splits", "read_omniglot_mat",
    "register", "search_dirs", "sets", "split_seed",
]
