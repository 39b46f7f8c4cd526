"""Static binarization: one fixed Bernoulli draw per pixel, seeded per split, so a binary data
set is the same array on every run and machine (the seed and rule go into the manifest)."""
from __future__ import annotations

import numpy as np

SPLITS = ("train", "valid", "test")
BINARIZATION_SEED = 0
BINARIZATION_RULE = ("pixel = 1 if u < intensity, u ~ U[0, 1) from numpy.random.default_rng("
                     "seed + i), i = 0, 1, 2 for train, valid, test")


def split_seed(seed: int, split: str) -> int:
    """The seed of one split's draws: `seed + i` for the i-th of SPLITS (BINARIZATION_RULE)."""
    return seed + SPLITS.index(split)


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
