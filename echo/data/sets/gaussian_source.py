"""A known-answer continuous source: X ~ N(0, diag(sigma_i^2)) in 8 dimensions (stored as
[N, 1, 1, 8] float32), generated with a fixed seed, no download, decoded by a Gaussian with the
stated fixed std TAU.

Its rate-distortion function under squared error is reverse water-filling,
D_mse(R) = sum_i min(lambda, sigma_i^2) at R = sum_i max(0, 1/2 ln(sigma_i^2 / lambda)) nats,
and with the Gaussian decoder's distortion D = ||x - g(z)||^2 / (2 tau^2) + (d/2) ln(2 pi tau^2)
the curve in this project's units is D(R) = D_mse(R) / (2 tau^2) + (d/2) ln(2 pi tau^2)
(echo.known_answer). The spec (variances, tau, seed) goes into the manifest.
"""
from __future__ import annotations

import numpy as np

from ..binarization import split_seed
from ..registry import DatasetSpec, DataSplits, LoadRequest, register

STDS = (2.0, 1.5, 1.0, 0.75, 0.5, 0.35, 0.25, 0.15)   # sigma_i
TAU = 0.5                              # the Gaussian decoder's std: D_mse / (2 tau^2) + const
SHAPE = (1, 1, len(STDS))
SIZES = {"train": 20_000, "valid": 2_000, "test": 10_000}


def spec() -> dict:
    variances = [s * s for s in STDS]
    return {"source": "N(0, diag(sigma_i^2))", "shape": list(SHAPE), "stds": list(STDS),
            "variances": variances, "tau": TAU, "sizes": dict(SIZES),
            "sample_rule": "numpy.random.default_rng(seed + i).standard_normal, i = 0, 1, 2 for "
                           "train, valid, test, times sigma_i",
            "rd": {"kind": "gaussian_mse", "variances": variances,
                   "curve": "reverse water-filling: D_mse = sum min(lambda, sigma_i^2), R = sum "
                            "max(0, ln(sigma_i^2 / lambda) / 2); D = D_mse / (2 tau^2) + "
                            "(d/2) ln(2 pi tau^2)"}}


def _load(spec_: DatasetSpec, request: LoadRequest) -> DataSplits:
    stds = np.asarray(STDS, dtype=np.float64)
    splits = {}
    for split in request.splits:
        rng = np.random.default_rng(split_seed(request.seed, split))
        x = (rng.standard_normal((SIZES[split], len(STDS))) * stds).astype(np.float32)
        splits[split] = (x.reshape(-1, *SHAPE), np.full(len(x), -1, dtype=np.int64))
    return DataSplits(spec_.name, f"gaussian_source: N(0, diag sigma^2), sigma = {list(STDS)}, "
                      f"decoder tau = {TAU}, sample seed {request.seed}", splits, [], None,
                      source="generated (echo/data/sets/gaussian_source.py)",
                      spec={**spec(), "sample_seed": request.seed})


GAUSSIAN_SOURCE = register(DatasetSpec(name="gaussian_source", pretty="Gaussian known-answer source",
                                       loader=_load, sizes=SIZES, likelihood="gaussian", tau=TAU,
                                       known_answer=spec))
