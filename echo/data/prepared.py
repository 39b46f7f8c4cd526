"""Prepared data: <dir>/<name>.npz (train/valid/test _x, _y) and <dir>/<name>.manifest.json,
which the pipeline's first stage writes and later stages verify before they use the data."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..files import atomic_write, file_digest
from .binarization import BINARIZATION_RULE, BINARIZATION_SEED, SPLITS
from .errors import DataError
from .registry import dataset_spec, load_splits

MANIFEST_VERSION = 1


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


def _declared_likelihood(name: str) -> dict:
    """The decoder the data set asks for (a run may override it: train.likelihood)."""
    spec = dataset_spec(name)
    return {"likelihood": spec.likelihood, **({"tau": spec.tau} if spec.tau is not None else {})}


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
            "declared_likelihood": _declared_likelihood(name),
            "known_answer": data.spec,
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
