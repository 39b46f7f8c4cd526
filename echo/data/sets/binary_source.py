"""A known-answer binary source: 4x4 binary images drawn from a mixture of four products of
Bernoullis (templates), generated with fixed seeds, no download.

Its entropy H(X) is computed exactly by enumerating all 2^16 = 65,536 images, so its
rate-distortion function under this project's distortion (-log p(x|z), log-loss) is known:
R(D) = H(X) - D for 0 <= D <= H(X), i.e. every achievable point has R + D >= H(X)
(echo.known_answer). The spec (templates, weights, seeds, H(X)) goes into the manifest.
"""
from __future__ import annotations

import functools
import itertools

import numpy as np

from ..binarization import split_seed
from ..registry import DatasetSpec, DataSplits, LoadRequest, register

SHAPE = (1, 4, 4)                     # [C, H, W]: 16 pixels
SIZES = {"train": 20_000, "valid": 2_000, "test": 10_000}
TEMPLATE_SEED = 2019                  # fixes the templates (part of the source, not a run)
WEIGHTS = (0.4, 0.3, 0.2, 0.1)        # mixture weights of the templates
LOW, HIGH = 0.1, 0.9                  # each template pixel is on with one of these probabilities


def templates() -> np.ndarray:
    """The source's templates [K, 16]: pixel-on probabilities, LOW or HIGH, from TEMPLATE_SEED."""
    rng = np.random.default_rng(TEMPLATE_SEED)
    return np.where(rng.random((len(WEIGHTS), int(np.prod(SHAPE)))) < 0.5, LOW, HIGH)


def all_images(pixels: int) -> np.ndarray:
    """Every binary image of `pixels` pixels [2^pixels, pixels], as float64."""
    return np.array(list(itertools.product((0.0, 1.0), repeat=pixels)))


def mixture_log_prob(x: np.ndarray, probs: np.ndarray, weights) -> np.ndarray:
    """log p(x) of binary images x [N, P] under sum_k w_k prod_i Bernoulli(x_i; probs[k, i])."""
    log_w = np.log(np.asarray(weights, dtype=np.float64))
    per_template = x @ np.log(probs).T + (1 - x) @ np.log1p(-probs).T     # [N, K]
    joint = per_template + log_w
    top = joint.max(1, keepdims=True)
    return (top + np.log(np.exp(joint - top).sum(1, keepdims=True)))[:, 0]


def mixture_entropy(probs: np.ndarray, weights) -> float:
    """H(X) in nats by enumerating every image: -sum_x p(x) log p(x) (2^P terms)."""
    log_p = mixture_log_prob(all_images(probs.shape[1]), probs, weights)
    return float(-(np.exp(log_p) * log_p).sum())


def sample(probs: np.ndarray, weights, n: int, seed: int) -> np.ndarray:
    """n images [n, P] uint8: a template drawn by weight, then its pixels independently."""
    rng = np.random.default_rng(seed)
    k = rng.choice(len(weights), size=n, p=np.asarray(weights))
    return (rng.random((n, probs.shape[1])) < probs[k]).astype(np.uint8)


@functools.lru_cache(maxsize=1)
def _spec() -> dict:
    probs = templates()
    return {"source": "mixture of Bernoulli-product templates", "shape": list(SHAPE),
            "weights": list(WEIGHTS), "templates": probs.tolist(), "template_seed": TEMPLATE_SEED,
            "sizes": dict(SIZES), "sample_rule": "numpy.random.default_rng(seed + i), i = 0, 1, "
            "2 for train, valid, test: a template index by weight, then each pixel on with its "
            "probability",
            "rd": {"kind": "log_loss", "entropy": mixture_entropy(probs, WEIGHTS),
                   "entropy_method": f"exact, by enumerating all {2 ** probs.shape[1]} images",
                   "curve": "R(D) = H(X) - D, 0 <= D <= H(X)"}}


def spec() -> dict:
    """The source's spec (a copy): templates, weights, seeds, sizes and H(X)."""
    return {**_spec(), "rd": dict(_spec()["rd"])}


def _load(spec_: DatasetSpec, request: LoadRequest) -> DataSplits:
    probs = templates()
    splits = {}
    for split in request.splits:
        x = sample(probs, WEIGHTS, SIZES[split], split_seed(request.seed, split))
        splits[split] = (x.reshape(-1, *SHAPE), np.full(len(x), -1, dtype=np.int64))
    return DataSplits(spec_.name, f"binary_source: {len(WEIGHTS)}-template Bernoulli mixture, "
                      f"4x4, H(X) = {_spec()['rd']['entropy']:.4f} nats, sample seed "
                      f"{request.seed}", splits, [], None,
                      source="generated (echo/data/sets/binary_source.py)",
                      spec={**spec(), "sample_seed": request.seed})


BINARY_SOURCE = register(DatasetSpec(name="binary_source", pretty="binary known-answer source",
                                     loader=_load, sizes=SIZES, known_answer=spec))
