"""Readers of the raw formats: IDX (MNIST, Fashion-MNIST), Larochelle & Murray's .amat and
Burda et al.'s chardata.mat (Omniglot). Each returns numpy arrays and checks the format as it
reads; a check that fails raises `DataError` with one line naming the file and what was expected.
IDX and .amat files may be gzipped or not (detected from the bytes, not the name)."""
from __future__ import annotations

import gzip
import zlib
from pathlib import Path
from typing import Mapping

import numpy as np

from .errors import DataError

IMAGE_SIDE = 28
PIXELS = IMAGE_SIDE * IMAGE_SIDE


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
                        f"replace it (or set check_sizes=False for a custom subset)",
                        check_sizes=False)
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
                        f"(or set check_sizes=False for a custom subset)", check_sizes=False)
    return x


def omniglot_images(matrix: np.ndarray) -> np.ndarray:
    """Images [N, 28, 28] from a chardata.mat matrix [784, N].

    Each column is one image flattened in MATLAB's column-major (Fortran) order, so image n is
    `matrix[:, n].reshape(28, 28, order="F")`. This is what Burda et al.'s loader does with
    `data.T.reshape((-1, 28, 28)).reshape((-1, 784), order='fortran')` followed by a row-major
    reshape to 28x28; a plain `data.T.reshape(-1, 28, 28)` would give every image transposed."""
    return matrix.T.reshape(-1, IMAGE_SIDE, IMAGE_SIDE).transpose(0, 2, 1)


def read_chardata(path: Path, expected: Mapping[str, int] | None = None
                  ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train"/"test": (intensities [N, 28, 28] float64 in [0, 1], alphabet labels [N] int64)}
    from Burda et al.'s chardata.mat (keys data/testdata [784, N], target/testtarget [50, N]
    one-hot alphabets; labels are -1 when the target matrices are absent). `expected`: the
    image count each part must have (none checked when None)."""
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
        if expected is not None and m.shape[1] != expected[split]:
            raise DataError(f"{path}: {key!r} holds {m.shape[1]} images, the canonical file has "
                            f"{expected[split]}; replace it (or set check_sizes=False)",
                            check_sizes=False)
        labels = np.full(m.shape[1], -1, dtype=np.int64)
        if target_key in mat:
            t = np.asarray(mat[target_key])
            if t.ndim != 2 or t.shape[1] != m.shape[1]:
                raise DataError(f"{path}: {target_key!r} has shape {t.shape}, expected "
                                f"alphabets x {m.shape[1]} (one-hot columns)")
            labels = t.argmax(axis=0).astype(np.int64)
        out[split] = (omniglot_images(m.astype(np.float64)), labels)
    return out
