"""Writers of tiny raw data files in each format the data layer reads (IDX, .amat, chardata.mat),
so tests exercise the real readers without the real (large) files."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def idx_bytes(array: np.ndarray) -> bytes:
    """An unsigned-byte IDX file: 0, 0, 0x08, ndim, big-endian int32 dims, data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


def write_idx(path: Path, array: np.ndarray) -> Path:
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def fake_mnist(n_train: int = 12, n_test: int = 6, seed: int = 0):
    """Random grey images [N, 28, 28] uint8 and labels 0..9 for a train and a test part."""
    rng = np.random.default_rng(seed)
    return {part: (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
                   rng.integers(0, 10, n).astype(np.uint8))
            for part, n in (("train", n_train), ("test", n_test))}


def write_mnist_dir(directory: Path, parts=None, gz: bool = True) -> dict:
    """The four MNIST IDX files in `directory`; returns the arrays written."""
    parts = parts or fake_mnist()
    directory.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for (part, (images, labels)), (img_name, lbl_name) in zip(
            parts.items(), (IDX_NAMES[:2], IDX_NAMES[2:])):
        write_idx(directory / (img_name + suffix), images)
        write_idx(directory / (lbl_name + suffix), labels)
    return parts


def amat_text(bits: np.ndarray) -> str:
    """Larochelle & Murray's .amat layout: one image per line, 784 space-separated 0/1 values."""
    return "".join(" ".join(str(int(v)) for v in row) + "\n" for row in bits.reshape(len(bits), -1))


def write_amat_dir(directory: Path, sizes=(5, 3, 4), seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in zip(("train", "valid", "test"), sizes):
        bits = (rng.random((n, 28, 28)) < 0.3).astype(np.uint8)
        (directory / f"binarized_mnist_{split}.amat").write_text(amat_text(bits))
        out[split] = bits
    return out


def column_major(images: np.ndarray) -> np.ndarray:
    """[784, N]: each image flattened column-major, as MATLAB's X(:) stores it in chardata.mat."""
    return np.stack([img.reshape(-1, order="F") for img in images], axis=1)


def write_chardata(path: Path, n_train: int = 7, n_test: int = 4, seed: int = 2, **override) -> dict:
    """A chardata.mat shaped like Burda et al.'s: data/testdata [784, N] intensities in [0, 1],
    target/testtarget [50, N] one-hot alphabets. Returns the images [N, 28, 28] and labels."""
    from scipy.io import savemat
    rng = np.random.default_rng(seed)
    images = {s: rng.random((n, 28, 28)) for s, n in (("train", n_train), ("test", n_test))}
    labels = {s: rng.integers(0, 50, len(images[s])) for s in images}
    content = {"data": column_major(images["train"]), "testdata": column_major(images["test"]),
               "target": np.eye(50)[:, labels["train"]], "testtarget": np.eye(50)[:, labels["test"]]}
    content.update(override)
    content = {k: v for k, v in content.items() if v is not None}
    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(path, content)
    return {"images": images, "labels": labels}
