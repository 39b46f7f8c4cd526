"""Data sets as float tensors [N, C, H, W] in [0, 1], read from their raw formats, and the
prepared `.npz` + manifest that the pipeline's first stage writes and later stages verify.

Data sets (the paper's three plus two conveniences):
- `binary_mnist`: Larochelle & Murray's static binarization (`binarized_mnist_{train,valid,test}.amat`)
  when those files are present (or downloadable); otherwise a static binarization of MNIST with a
  fixed seed. The variant used is named in `DataSplits.variant` and in the manifest.
- `mnist`, `fashion_mnist`: grey levels from the canonical IDX files; train = first 50,000 of the
  training file, valid = its last 10,000, test = the 10,000 test images.
- `omniglot`: Burda et al.'s 28x28 split (`chardata.mat`, 24,345 train / 8,070 test, 50 alphabets),
  statically binarized. The split has no validation set: `valid` is empty.
- `digits`: scikit-learn's bundled 8x8 digits, binarized and split with a fixed seed (no download).

Raw layout (`root`, default `$ECHO_DATA_ROOT` or `data/raw`), first match wins:
  mnist          root/mnist/, root/MNIST/raw/ (torchvision's layout), or root/ itself
  fashion_mnist  root/fashion_mnist/ or root/FashionMNIST/raw/
  binary_mnist   root/binary_mnist/ or root/ (the .amat files); else the mnist layout above
  omniglot       root/omniglot/chardata.mat or root/chardata.mat
IDX files may be gzipped or not (detected from the bytes, not the name).

Every check that fails raises `DataError` with one line naming the file and what was expected.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import json
import logging
import os
import shutil
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .files import atomic_write, file_digest

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
DATASETS = ("binary_mnist", "mnist", "fashion_mnist", "omniglot", "digits")
BINARIZATION_SEED = 0
DATA_ROOT_ENV = "ECHO_DATA_ROOT"
MANIFEST_VERSION = 1
IMAGE_SIDE = 28
PIXELS = IMAGE_SIDE * IMAGE_SIDE

# Published file checksums (md5 of the .gz as served by the mirrors; the same values torchvision
# checks). Larochelle's .amat files and Burda's chardata.mat have no published checksum: they are
# verified by their format and canonical sizes, and their sha256 goes into the manifest.
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
PUBLISHED_MD5 = {
    "mnist": dict(zip((f + ".gz" for f in IDX_FILES), (
        "f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
        "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c"))),
    "fashion_mnist": dict(zip((f + ".gz" for f in IDX_FILES), (
        "8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
        "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310"))),
    "binary_mnist": {f"binarized_mnist_{s}.amat": None for s in SPLITS},
    "omniglot": {"chardata.mat": None},
}
MIRRORS = {
    "mnist": ["https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"],
    "fashion_mnist": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                      "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"],
    "binary_mnist": ["http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"],
    "omniglot": ["https://raw.githubusercontent.com/yburda/iwae/master/datasets/OMNIGLOT/"],
}
# Sizes of the canonical raw files, checked unless check_sizes=False (for custom subsets).
CANONICAL_SIZES = {
    "mnist": {"train": 60_000, "test": 10_000},
    "fashion_mnist": {"train": 60_000, "test": 10_000},
    "binary_mnist": {"train": 50_000, "valid": 10_000, "test": 10_000},
    "omniglot": {"train": 24_345, "test": 8_070},
}
_PRETTY = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST"}


class DataError(ValueError):
    """A missing or malformed data file; the message names the file and the fix."""


def default_root() -> Path:
    return Path(os.environ.get(DATA_ROOT_ENV, "data/raw"))


# ----------------------------------------------------------------------------------------------
# Raw formats


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when it starts with the gzip magic (whatever its name)."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: cannot read or decompress ({err}); the file is truncated or "
                        f"corrupt, replace it") from None
    return raw


def read_idx(path: Path, *, ndim: int | None = None) -> np.ndarray:
    """Read an unsigned-byte IDX file (optionally gzipped); check magic number and length.

    IDX header: two zero bytes, type code 0x08 (unsigned byte), the number of dimensions, then
    each dimension as a big-endian int32. MNIST images have magic 2051 (3 dims), labels 2049."""
    path = Path(path)
    raw = _read_bytes(path)
    magic = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if magic is None or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: bad magic number {magic}: not an unsigned-byte IDX file "
                        f"(expected 0x0000080N, e.g. 2049 labels / 2051 images)")
    if ndim is not None and raw[3] != ndim:
        raise DataError(f"{path}: magic number {magic} means {raw[3]} dimensions, expected "
                        f"{0x800 + ndim} ({ndim} dimensions); are image and label files swapped?")
    header = 4 + 4 * raw[3]
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes, expected {header})")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(raw[3]))
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        raise DataError(f"{path}: {len(raw)} bytes, expected {expected} for shape {dims}; "
                        f"the file is truncated or corrupt")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def read_idx_pair(images_path: Path, labels_path: Path, expected: int | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(images [N, 28, 28] uint8, labels [N] int64) from an MNIST-style image/label file pair."""
    images = read_idx(images_path, ndim=3)
    labels = read_idx(labels_path, ndim=1)
    if images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise DataError(f"{images_path}: images of {images.shape[1]}x{images.shape[2]} pixels, "
                        f"expected 28x28")
    if len(images) != len(labels):
        raise DataError(f"{labels_path}: {len(labels)} labels but {images_path.name} has "
                        f"{len(images)} images; the pair must match")
    if expected is not None and len(images) != expected:
        raise DataError(f"{images_path}: {len(images)} images, the canonical file has {expected}; "
                        f"replace it (or set data.check_sizes: false for a custom subset)")
    if labels.size and labels.max() > 9:
        raise DataError(f"{labels_path}: label {int(labels.max())} found, expected 0..9")
    return images, labels.astype(np.int64)


def read_amat(path: Path, expected: int | None = None) -> np.ndarray:
    """Larochelle & Murray's .amat: one image per line, 784 space-separated 0/1 values.
    Returns uint8 [N, 784]."""
    path = Path(path)
    raw = _read_bytes(path)
    lines = [line for line in raw.split(b"\n") if line.strip()]
    if not lines:
        raise DataError(f"{path}: empty; expected one line of {PIXELS} values 0/1 per image")
    # Fast path: every value is a single character, so a line holds 784 digits once spaces go.
    digits = [line.translate(None, b" \t\r") for line in lines]
    if all(len(d) == PIXELS for d in digits):
        x = np.frombuffer(b"".join(digits), dtype=np.uint8).reshape(len(lines), PIXELS) - ord("0")
        bad = np.argwhere(x > 1)
        if len(bad):
            raise DataError(f"{path} line {bad[0, 0] + 1}: value "
                            f"{chr(x[bad[0, 0], bad[0, 1]] + ord('0'))!r}, expected 0 or 1")
    else:
        x = np.empty((len(lines), PIXELS), dtype=np.uint8)
        for i, line in enumerate(lines):
            values = line.split()
            if len(values) != PIXELS:
                raise DataError(f"{path} line {i + 1}: {len(values)} values, expected {PIXELS}; "
                                f"the file is truncated or not a 28x28 .amat")
            try:
                row = np.array([float(v) for v in values])
            except ValueError:
                raise DataError(f"{path} line {i + 1}: non-numeric value; expected 0 or 1") from None
            if not np.isin(row, (0.0, 1.0)).all():
                raise DataError(f"{path} line {i + 1}: values other than 0/1; expected a binary .amat")
            x[i] = row
    if expected is not None and len(x) != expected:
        raise DataError(f"{path}: {len(x)} images, the canonical file has {expected}; replace it "
                        f"(or set data.check_sizes: false for a custom subset)")
    return x


def omniglot_images(matrix: np.ndarray) -> np.ndarray:
    """Images [N, 28, 28] from a chardata.mat matrix [784, N].

    Each column is one image flattened in MATLAB's column-major (Fortran) order, so image n is
    `matrix[:, n].reshape(28, 28, order="F")`. This is what Burda et al.'s loader does with
    `data.T.reshape((-1, 28, 28)).reshape((-1, 784), order='fortran')` followed by a row-major
    reshape to 28x28; a plain `data.T.reshape(-1, 28, 28)` would give every image transposed."""
    return matrix.T.reshape(-1, IMAGE_SIDE, IMAGE_SIDE).transpose(0, 2, 1)


def read_omniglot_mat(path: Path, check_sizes: bool = True) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train"/"test": (intensities [N, 28, 28] float64 in [0, 1], alphabet labels [N] int64)}
    from Burda et al.'s chardata.mat (keys data/testdata [784, N], target/testtarget [50, N]
    one-hot alphabets; labels are -1 when the target matrices are absent)."""
    from scipy.io import loadmat    # scipy only for Omniglot
    path = Path(path)
    try:
        mat = loadmat(path)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except Exception as err:        # scipy raises many types for damaged files
        raise DataError(f"{path}: not a readable MATLAB file ({type(err).__name__}: {err}); the "
                        f"file is truncated or corrupt, replace it") from None
    out = {}
    for split, key, target_key in (("train", "data", "target"), ("test", "testdata", "testtarget")):
        if key not in mat:
            found = sorted(k for k in mat if not k.startswith("__"))
            raise DataError(f"{path}: no variable {key!r} (found {found}); expected Burda et al.'s "
                            f"chardata.mat with data/testdata")
        m = np.asarray(mat[key])
        if m.ndim != 2 or m.shape[0] != PIXELS:
            raise DataError(f"{path}: {key!r} has shape {m.shape}, expected {PIXELS} x N "
                            f"(pixels x images, column-major 28x28)")
        if not (np.isfinite(m).all() and m.min() >= 0 and m.max() <= 1):
            raise DataError(f"{path}: {key!r} has values outside [0, 1]")
        expected = CANONICAL_SIZES["omniglot"][split]
        if check_sizes and m.shape[1] != expected:
            raise DataError(f"{path}: {key!r} holds {m.shape[1]} images, the canonical file has "
                            f"{expected}; replace it (or set data.check_sizes: false)")
        labels = np.full(m.shape[1], -1, dtype=np.int64)
        if target_key in mat:
            t = np.asarray(mat[target_key])
            if t.ndim != 2 or t.shape[1] != m.shape[1]:
                raise DataError(f"{path}: {target_key!r} has shape {t.shape}, expected "
                                f"alphabets x {m.shape[1]} (one-hot columns)")
            labels = t.argmax(axis=0).astype(np.int64)
        out[split] = (omniglot_images(m.astype(np.float64)), labels)
    return out


# ----------------------------------------------------------------------------------------------
# Binarization


BINARIZATION_RULE = ("pixel = 1 if u < intensity, u ~ U[0, 1) from numpy.random.default_rng("
                     "seed + i), i = 0, 1, 2 for train, valid, test")


def binarize(p: np.ndarray, seed: int, *, scale: float = 1.0, chunk: int = 4096) -> np.ndarray:
    """Static binarization: pixel = 1 with probability p/scale, one fixed Bernoulli draw per pixel
    (u < p with u ~ U[0, 1) from numpy's PCG64 stream seeded `seed`). Drawn row-chunk by chunk:
    float64 draws consume one 64-bit output each, so the result does not depend on `chunk`."""
    rng = np.random.default_rng(seed)
    out = np.empty(p.shape, dtype=np.uint8)
    for start in range(0, len(p), chunk):
        block = p[start:start + chunk].astype(np.float64) / scale
        out[start:start + chunk] = rng.random(block.shape) < block
    return out


# ----------------------------------------------------------------------------------------------
# Where raw files are, and downloads


def _search_dirs(name: str, root: Path) -> list[Path]:
    return {
        "mnist": [root / "mnist", root / "MNIST" / "raw", root],
        "fashion_mnist": [root / "fashion_mnist", root / "FashionMNIST" / "raw"],
        "binary_mnist": [root / "binary_mnist", root],
        "omniglot": [root / "omniglot", root],
    }[name]


def _present(directory: Path, filename: str) -> Path | None:
    """The file, accepting IDX files with or without .gz."""
    for candidate in (directory / filename, directory / filename.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    return None


def find_raw_files(name: str, root: Path) -> dict[str, Path] | None:
    """{published file name: local path} from the first directory holding all of them, else None."""
    wanted = list(PUBLISHED_MD5[name])
    for directory in _search_dirs(name, root):
        found = {f: _present(directory, f) for f in wanted}
        if all(found.values()):
            return found
    return None


def fetch(url: str, dest: Path, md5: str | None = None, *, timeout: float = 60) -> Path:
    """Download `url` to `dest` through a temporary file, checking the md5 when one is given;
    `dest` appears only complete and verified."""
    dest.parent.mkdir(parents=True, exist_ok=True)

    def download_into(tmp: Path) -> None:
        with open(tmp, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            shutil.copyfileobj(response, out, 1 << 20)
        if md5 is not None and (got := file_digest(tmp, "md5")) != md5:
            raise DataError(f"{url}: downloaded file has md5 {got}, expected {md5}; the mirror "
                            f"served a different or damaged file")

    atomic_write(dest, download_into)
    return dest


def fetch_all(files: dict[str, str | None], mirrors: list[str], dest_dir: Path) -> None:
    """Each file from the first mirror that serves it with the right checksum."""
    for filename, md5 in files.items():
        if _present(dest_dir, filename):
            continue
        errors = []
        for mirror in mirrors:
            try:
                log.info("downloading %s%s", mirror, filename)
                fetch(mirror + filename, dest_dir / filename, md5)
                break
            except (OSError, DataError) as err:   # URLError and timeouts are OSErrors
                errors.append(f"{mirror}: {err}")
        else:
            raise DataError(f"could not download {filename} ({'; '.join(errors)})")


def download(name: str, root: Path) -> None:
    """Fetch a data set's raw files into `root`: torchvision's classes for (Fashion-)MNIST when
    torchvision imports (its layout root/MNIST/raw), else the official mirrors into root/<name>/."""
    if name in ("mnist", "fashion_mnist"):
        try:
            import torchvision.datasets as tvd    # optional and heavy: imported only here
        except Exception:
            tvd = None
        if tvd is not None:
            dataset_class = tvd.MNIST if name == "mnist" else tvd.FashionMNIST
            try:
                for train in (True, False):
                    dataset_class(str(root), train=train, download=True)
                return
            except Exception as err:
                raise DataError(f"torchvision could not download {name}: {err}") from None
    fetch_all(PUBLISHED_MD5[name], MIRRORS[name], root / name)


def _missing_message(name: str, root: Path, why: str) -> str:
    files = ", ".join(PUBLISHED_MD5[name])
    where = " or ".join(str(d) + "/" for d in _search_dirs(name, root))
    return f"{name}: raw files not found; place {files} in {where} (from {MIRRORS[name][0]}); {why}"


def locate(name: str, root: Path, download_missing: bool = False) -> dict[str, Path]:
    """The raw files of `name` under `root`, downloading them first when asked and missing."""
    found = find_raw_files(name, root)
    if found is not None:
        return found
    if not download_missing:
        raise DataError(_missing_message(name, root, "downloads are off (data.download: false / download=False)"))
    try:
        download(name, root)
    except DataError as err:
        raise DataError(_missing_message(name, root, f"download failed: {err}")) from None
    found = find_raw_files(name, root)
    if found is None:
        raise DataError(_missing_message(name, root, "the download left no complete set"))
    return found


# ----------------------------------------------------------------------------------------------
# Data sets


@dataclass
class DataSplits:
    """The splits of a data set as numpy arrays, with where they came from."""
    name: str
    variant: str                                   # which data exactly, in words
    splits: dict[str, tuple[np.ndarray, np.ndarray]]   # split -> (x [N,C,H,W] uint8|float32, y [N])
    raw_files: list[Path] = field(default_factory=list)
    binarization_seed: int | None = None
    source: str | None = None                      # where data without raw files came from


def _split_seed(seed: int, split: str) -> int:
    return seed + SPLITS.index(split)


def _mnist_family(name: str, root: Path, splits, *, download_missing: bool, check_sizes: bool,
                  binarize_seed: int | None = None) -> DataSplits:
    files = locate(name, root, download_missing)
    sizes = CANONICAL_SIZES[name] if check_sizes else {}
    out = {}
    used = []
    if {"train", "valid"} & set(splits):
        images, labels = read_idx_pair(files[IDX_FILES[0] + ".gz"], files[IDX_FILES[1] + ".gz"],
                                       sizes.get("train"))
        used += [files[IDX_FILES[0] + ".gz"], files[IDX_FILES[1] + ".gz"]]
        n_valid = len(images) // 6          # 10,000 of 60,000: the binary MNIST literature's split
        cut = len(images) - n_valid
        out["train"] = (images[:cut], labels[:cut])
        out["valid"] = (images[cut:], labels[cut:])
    if "test" in splits:
        out["test"] = read_idx_pair(files[IDX_FILES[2] + ".gz"], files[IDX_FILES[3] + ".gz"],
                                    sizes.get("test"))
        used += [files[IDX_FILES[2] + ".gz"], files[IDX_FILES[3] + ".gz"]]
    result = {}
    for split in splits:
        images, labels = out[split]
        if binarize_seed is None:
            x = (images.astype(np.float32) / 255.0)[:, None]
        else:
            x = binarize(images, _split_seed(binarize_seed, split), scale=255.0)[:, None]
        result[split] = (x, labels)
    pretty = _PRETTY[name]
    if binarize_seed is None:
        variant = f"{name}: {pretty} grey levels in [0, 1] from the IDX files"
    else:
        variant = f"binary_mnist: static binarization of MNIST, seed {binarize_seed}"
    return DataSplits(name if binarize_seed is None else "binary_mnist", variant, result, used,
                      binarize_seed)


def _binary_mnist(root: Path, splits, *, download_missing: bool, check_sizes: bool,
                  seed: int) -> DataSplits:
    files = find_raw_files("binary_mnist", root)
    if files is None and download_missing:
        try:
            download("binary_mnist", root)
            files = find_raw_files("binary_mnist", root)
        except DataError as err:
            log.warning("binary_mnist: could not download the Larochelle & Murray .amat files (%s)",
                        err)
    if files is None:
        log.warning("binary_mnist: binarized_mnist_{train,valid,test}.amat not in %s; using a "
                    "static binarization of MNIST with seed %d instead (not the paper's exact data)",
                    " or ".join(map(str, _search_dirs("binary_mnist", root))), seed)
        try:
            return _mnist_family("mnist", root, splits, download_missing=download_missing,
                                 check_sizes=check_sizes, binarize_seed=seed)
        except DataError as err:
            raise DataError(f"binary_mnist: no binarized_mnist_{{train,valid,test}}.amat in "
                            f"{root / 'binary_mnist'}/ or {root}/, and no MNIST to binarize: {err}"
                            ) from None
    result, used = {}, []
    for split in splits:
        path = files[f"binarized_mnist_{split}.amat"]
        expected = CANONICAL_SIZES["binary_mnist"][split] if check_sizes else None
        x = read_amat(path, expected).reshape(-1, 1, IMAGE_SIDE, IMAGE_SIDE)
        result[split] = (x, np.full(len(x), -1, dtype=np.int64))   # the .amat files carry no labels
        used.append(path)
    return DataSplits("binary_mnist", "binary_mnist: Larochelle & Murray static binarization "
                      "(.amat files)", result, used, None)


def _omniglot(root: Path, splits, *, download_missing: bool, check_sizes: bool,
              seed: int) -> DataSplits:
    path = locate("omniglot", root, download_missing)["chardata.mat"]
    parts = read_omniglot_mat(path, check_sizes)
    empty = (np.zeros((0, IMAGE_SIDE, IMAGE_SIDE)), np.zeros(0, dtype=np.int64))
    result = {}
    for split in splits:
        images, labels = parts.get(split, empty)       # no validation set in Burda's split
        result[split] = (binarize(images, _split_seed(seed, split))[:, None], labels)
    return DataSplits("omniglot", f"omniglot: Burda et al. 28x28 chardata.mat, static "
                      f"binarization, seed {seed}", result, [path], seed)


DIGITS_SPLIT = {"test": 360, "valid": 180}      # the rest (1,257) is train


@functools.lru_cache(maxsize=1)
def _sklearn_digits() -> tuple[np.ndarray, np.ndarray, str]:
    """scikit-learn's bundled digits (images 8x8 with intensities 0..16, labels, version);
    cached because training asks for the train and the test split separately."""
    import sklearn
    from sklearn.datasets import load_digits
    bunch = load_digits()
    return bunch.images, bunch.target, sklearn.__version__


def _digits(splits, seed: int) -> DataSplits:
    raw_images, targets, version = _sklearn_digits()
    images = raw_images.astype(np.float64) / 16.0
    order = np.random.default_rng(seed).permutation(len(images))
    n_test, n_valid = DIGITS_SPLIT["test"], DIGITS_SPLIT["valid"]
    parts = {"test": order[:n_test], "valid": order[n_test:n_test + n_valid],
             "train": order[n_test + n_valid:]}
    result = {}
    for split in splits:
        idx = parts[split]
        result[split] = (binarize(images[idx], _split_seed(seed, split))[:, None],
                         targets[idx].astype(np.int64))
    digest = hashlib.sha256(np.ascontiguousarray(raw_images).tobytes()).hexdigest()
    return DataSplits("digits", f"digits: scikit-learn 8x8 digits, static binarization and "
                      f"split, seed {seed}", result, [], seed,
                      source=f"sklearn.datasets.load_digits (scikit-learn {version}, "
                             f"images sha256 {digest})")


def load_splits(name: str, root: str | Path | None = None, splits=SPLITS, *,
                download: bool = False, seed: int = BINARIZATION_SEED,
                check_sizes: bool = True) -> DataSplits:
    """The requested splits of a data set as numpy arrays, with provenance for the manifest."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {list(DATASETS)}")
    bad = [s for s in splits if s not in SPLITS]
    if bad:
        raise ValueError(f"split must be one of {SPLITS}, got {bad[0]!r}")
    root = Path(root) if root is not None else default_root()
    options = dict(download_missing=download, check_sizes=check_sizes)
    if name in ("mnist", "fashion_mnist"):
        return _mnist_family(name, root, splits, **options)
    if name == "binary_mnist":
        return _binary_mnist(root, splits, seed=seed, **options)
    if name == "omniglot":
        return _omniglot(root, splits, seed=seed, **options)
    return _digits(splits, seed)


def load_dataset(name: str, split: str = "train", root: str | Path | None = None, *,
                 download: bool = False, seed: int = BINARIZATION_SEED, check_sizes: bool = True
                 ) -> tuple[Tensor, Tensor]:
    """(images [N, C, H, W] float32 in [0, 1], labels [N] int64; -1 where the data has none)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")
    x, y = load_splits(name, root, (split,), download=download, seed=seed,
                       check_sizes=check_sizes).splits[split]
    return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y)


# ----------------------------------------------------------------------------------------------
# Prepared data: <dir>/<name>.npz and <dir>/<name>.manifest.json


def manifest_path(npz_path: str | Path) -> Path:
    return Path(npz_path).with_suffix(".manifest.json")


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """An .npz that np.load reads, written byte-reproducibly (fixed zip timestamps, unlike
    np.savez) so the same data always has the same checksum."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for key, array in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.ascontiguousarray(array), allow_pickle=False)


def _split_summary(x: np.ndarray, y: np.ndarray) -> dict:
    n = len(x)
    summary = {"n": n, "shape": list(x.shape), "dtype": str(x.dtype)}
    if n:
        summary.update(pixel_mean=round(float(x.mean(dtype=np.float64)), 6),
                       pixel_std=round(float(x.std(dtype=np.float64)), 6),
                       pixel_min=float(x.min()), pixel_max=float(x.max()),
                       binary=bool(((x == 0) | (x == 1)).all()))
    if (y >= 0).any():
        summary["label_counts"] = np.bincount(y[y >= 0]).tolist()
    return summary


def prepare(name: str, raw_dir: str | Path, prepared_dir: str | Path, *, download: bool = True,
            seed: int = BINARIZATION_SEED, check_sizes: bool = True) -> dict:
    """Write <prepared_dir>/<name>.npz (train/valid/test _x, _y) and its manifest; return the
    manifest. Both files are written to temporaries and renamed into place, so a failure leaves
    any earlier pair untouched and never a partial file."""
    data = load_splits(name, raw_dir, SPLITS, download=download, seed=seed, check_sizes=check_sizes)
    out_dir = Path(prepared_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    npz_path = out_dir / f"{name}.npz"
    arrays = {}
    for split in SPLITS:
        arrays[f"{split}_x"], arrays[f"{split}_y"] = data.splits[split]
    manifest = {}

    def write_pair(tmp_npz: Path) -> None:
        # The manifest records the new .npz's digest, so it is written (atomically) once the
        # .npz temporary is complete and before that is renamed: a failure anywhere leaves the
        # earlier pair as it was and removes both temporaries.
        _write_npz(tmp_npz, arrays)
        manifest.update({
            "manifest_version": MANIFEST_VERSION,
            "dataset": name,
            "variant": data.variant,
            "binarization_seed": data.binarization_seed,
            "binarization_rule": BINARIZATION_RULE if data.binarization_seed is not None else None,
            "check_sizes": check_sizes,
            "splits": {s: _split_summary(*data.splits[s]) for s in SPLITS},
            "raw_files": [{"path": str(p), "bytes": p.stat().st_size, "sha256": file_digest(p),
                           "md5": file_digest(p, "md5")} for p in data.raw_files],
            "source": data.source,
            "prepared": {"path": npz_path.name, "bytes": tmp_npz.stat().st_size,
                         "sha256": file_digest(tmp_npz)},
        })
        atomic_write(manifest_path(npz_path),
                     lambda p: p.write_text(json.dumps(manifest, indent=2) + "\n"))

    atomic_write(npz_path, write_pair)
    return manifest


def check_prepared(npz_path: str | Path) -> dict:
    """Verify a prepared .npz against its manifest (sha256 of the whole file); return the manifest.
    Later stages call this before training so a changed or damaged file is never used silently."""
    npz_path = Path(npz_path)
    mpath = manifest_path(npz_path)
    if not npz_path.exists():
        raise DataError(f"missing prepared data {npz_path}: run `python -m stages.prepare` first")
    if not mpath.exists():
        raise DataError(f"{mpath}: missing manifest for {npz_path.name}; re-run "
                        f"`python -m stages.prepare`")
    try:
        manifest = json.loads(mpath.read_text())
        expected = manifest["prepared"]["sha256"]
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"{mpath}: not a valid manifest ({err}); re-run `python -m stages.prepare`"
                        ) from None
    got = file_digest(npz_path)
    if got != expected:
        raise DataError(f"{npz_path}: sha256 {got[:12]}… does not match {mpath.name} "
                        f"({expected[:12]}…); the file changed or is damaged, re-run "
                        f"`python -m stages.prepare`")
    return manifest


def load_prepared(path: str | Path, split: str) -> tuple[Tensor, Tensor]:
    """A split of a prepared data set: arrays `<split>_x` [N, C, H, W] and `<split>_y` [N].
    Verified against the manifest beside it when there is one (see `check_prepared`)."""
    path = Path(path)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not path.exists():
        raise DataError(f"missing prepared data {path}: run `python -m stages.prepare` first")
    if manifest_path(path).exists():
        check_prepared(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            if f"{split}_x" not in npz.files or f"{split}_y" not in npz.files:
                raise DataError(f"{path} has no split {split!r} (arrays: {sorted(npz.files)})")
            x, y = npz[f"{split}_x"], npz[f"{split}_y"]
    except DataError:
        raise
    except Exception as err:            # BadZipFile, truncated members, pickled objects, ...
        raise DataError(f"{path}: not a readable .npz ({type(err).__name__}: {err}); re-run "
                        f"`python -m stages.prepare`") from None
    if x.ndim != 4 or len(x) != len(y):
        raise DataError(f"{path}: {split}_x has shape {x.shape} and {split}_y {y.shape}; expected "
                        f"[N, C, H, W] images and [N] labels")
    return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64))
