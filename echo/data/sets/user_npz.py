"""A user's own arrays: `user.npz` in `<root>/user_npz/` or `<root>/` (root: data.raw_dir in
params.yaml, --data-root for python -m echo.train, `root=` in the library).

The file holds `train_x` and `test_x` (required), `valid_x` (optional; else empty) and
`train_y` / `valid_y` / `test_y` (optional integer labels; else -1). Each `*_x` is [N, d],
[N, H, W] or [N, C, H, W] (stored as [N, C, H, W]: [N, 1, 1, d] and [N, 1, H, W]), the same
shape per example in every split, of finite numbers: binary (kept as uint8), in [0, 1] or
real-valued (float32). The decoder is Bernoulli unless the run says `likelihood: gaussian`
(train.likelihood, --likelihood), which real-valued data needs; the run refuses real values
under a Bernoulli decoder. Every check names the file and the array; the manifest records the
file's sha256 and md5 (docs/data.md, "Your own data").
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..registry import DatasetSpec, DataSplits, LoadRequest, register

FILE = "user.npz"
FOLDERS = ("user_npz", "")


def find_file(root: Path) -> Path:
    """The first `user.npz` of FOLDERS under root, or a DataError saying where to put it."""
    for folder in FOLDERS:
        path = root / folder / FILE
        if path.is_file():
            return path
    where = " or ".join(str(root / f / FILE) for f in FOLDERS)
    raise DataError(f"user_npz: no {where} (root={str(root)!r}); write your arrays there with "
                    f"numpy.savez(path, train_x=..., test_x=...) or set root to its folder",
                    root=str(root))


def _as_images(x: np.ndarray, path: Path, key: str) -> np.ndarray:
    if x.dtype.kind not in "biuf":
        raise DataError(f"{path}: array {key!r} has dtype {x.dtype}; expected numbers (bool, "
                        f"integer or float)")
    if x.ndim not in (2, 3, 4):
        raise DataError(f"{path}: array {key!r} has shape {x.shape}; expected [N, d], "
                        f"[N, H, W] or [N, C, H, W]")
    if x.ndim == 2:
        x = x[:, None, None, :]
    elif x.ndim == 3:
        x = x[:, None]
    if x.size and not np.isfinite(x).all():
        raise DataError(f"{path}: array {key!r} has {int((~np.isfinite(x)).sum())} non-finite "
                        f"values (NaN or inf); remove or replace them")
    return x


def read_user_npz(path: Path, splits) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], str]:
    """({split: (x [N, C, H, W], y [N])}, "binary" | "[0, 1]" | "real-valued") from a user's
    .npz; one-line DataErrors naming the file and the array."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        raise DataError(f"{path}: not a readable .npz ({type(err).__name__}: {err}); write it "
                        f"with numpy.savez(path, train_x=..., test_x=...)") from None
    for key in ("train_x", "test_x"):
        if key not in arrays:
            raise DataError(f"{path}: no array {key!r} (it has {sorted(arrays)}); train_x and "
                            f"test_x are required, valid_x and *_y optional")
    known = {f"{s}_{part}" for s in ("train", "valid", "test") for part in ("x", "y")}
    unknown = sorted(set(arrays) - known)
    if unknown:
        raise DataError(f"{path}: unknown array(s) {unknown}; expected train_x, test_x and "
                        f"optionally valid_x, train_y, valid_y, test_y")
    xs = {s: _as_images(arrays[f"{s}_x"], path, f"{s}_x") for s in ("train", "valid", "test")
          if f"{s}_x" in arrays}
    shape = xs["train"].shape[1:]
    for split, x in xs.items():
        if x.shape[1:] != shape and len(x):
            raise DataError(f"{path}: array '{split}_x' has examples of shape {list(x.shape[1:])}"
                            f" but train_x has {list(shape)}; every split needs the same shape")
    if len(xs["train"]) < 2:
        raise DataError(f"{path}: array 'train_x' has {len(xs['train'])} examples; at least 2 "
                        f"are needed")
    if "valid" not in xs:
        xs["valid"] = np.zeros((0, *shape), dtype=xs["train"].dtype)
    values = np.concatenate([x.reshape(-1) for x in xs.values()])
    binary = bool(np.isin(values, (0, 1)).all())
    kind = "binary" if binary else "[0, 1]" if values.min() >= 0 and values.max() <= 1 \
        else "real-valued"
    out = {}
    for split in splits:
        x = xs[split].astype(np.uint8 if binary else np.float32)
        key = f"{split}_y"
        if key in arrays:
            y = arrays[key]
            if y.dtype.kind not in "iub" or y.shape != (len(x),):
                raise DataError(f"{path}: array {key!r} has shape {y.shape} and dtype {y.dtype}; "
                                f"expected {len(x)} integer labels, one per example of "
                                f"'{split}_x'")
            y = y.astype(np.int64)
        else:
            y = np.full(len(x), -1, dtype=np.int64)
        out[split] = (x, y)
    return out, kind


def _load(spec: DatasetSpec, request: LoadRequest) -> DataSplits:
    path = find_file(request.root)
    splits, kind = read_user_npz(path, request.splits)
    sizes = ", ".join(f"{s} {len(x)}" for s, (x, _) in splits.items())
    return DataSplits(spec.name, f"user_npz: {path} ({kind}; {sizes})", splits, [path], None)


# No `files`: the loader finds user.npz itself (FOLDERS) and it has no mirror to download from.
USER_NPZ = register(DatasetSpec(name="user_npz", pretty="your own .npz", loader=_load))
