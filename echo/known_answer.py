"""Known answers: the rate-distortion function of a source for which it is known in closed
form, and how far a trained model's (rate, distortion) point lies above it.

A data set declares its source (`DatasetSpec.known_answer() -> {"rd": ...}`, e.g.
echo/data/sets/binary_source.py and gaussian_source.py); `known_curve` turns that into the
curve D(R) in this project's units (nats of -log p(x|z) under the model's decoder):

- log-loss on a discrete source (Bernoulli decoder): R(D) = H(X) - D for 0 <= D <= H(X), so
  D(R) = max(H(X) - R, 0) and every achievable point has R + D >= H(X);
- squared error on X ~ N(0, diag sigma_i^2) (Gaussian decoder with fixed std tau): reverse
  water-filling, D_mse(R) = sum_i min(lambda, sigma_i^2) with R = sum_i max(0, ln(sigma_i^2 /
  lambda) / 2), and D(R) = D_mse(R) / (2 tau^2) + (d / 2) ln(2 pi tau^2).

No achievable point lies below D(R): not with an exact rate (Echo, I(X;Z)) and not with an
upper bound on I(X;Z) (the VAE's KL). A point below it by more than its statistical error
means a wrong rate or a biased estimate; `check_points` flags it. A point's statistical error
is that of the test-set means: excess = mean(d_i) - D(mean(r_i)), linearised at the point,
has standard error std(d_i - D'(R) r_i) / sqrt(n) (`point_error`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .data import REGISTRY
from .metrics import batches
from .networks import Bernoulli, Gaussian

FLAG_Z = 3.0        # a point is flagged when it lies below the curve by more than FLAG_Z errors


@dataclass(frozen=True)
class RDCurve:
    """D(R) of a source in nats of the decoder's -log p(x|z); `kind` "log_loss" or
    "gaussian_mse"."""
    kind: str
    entropy: float | None = None              # log_loss: H(X)
    variances: tuple[float, ...] = ()         # gaussian_mse: sigma_i^2
    tau: float | None = None                  # gaussian_mse: the decoder's std

    def water_level(self, rate) -> np.ndarray:
        """gaussian_mse: lambda(R) of reverse water-filling, elementwise over `rate` (nats)."""
        rate = np.maximum(np.asarray(rate, dtype=np.float64), 0.0)
        log_var = np.sort(np.log(np.asarray(self.variances, dtype=np.float64)))[::-1]
        level = np.empty_like(rate)
        for index, r in np.ndenumerate(rate):
            # With the k largest variances active: ln lambda = (sum_{i<k} ln sigma_i^2 - 2R) / k;
            # the right k is the largest whose smallest active variance stays above lambda.
            for k in range(len(log_var), 0, -1):
                log_level = (log_var[:k].sum() - 2 * r) / k
                if log_level <= log_var[k - 1]:
                    break
            level[index] = math.exp(log_level)
        return level

    def mse_at(self, rate) -> np.ndarray:
        """gaussian_mse: D_mse(R) = sum_i min(lambda(R), sigma_i^2)."""
        level = self.water_level(rate)
        return np.minimum(level[..., None], np.asarray(self.variances)).sum(-1)

    def distortion_at(self, rate) -> np.ndarray:
        """D(R): the least distortion (nats) any code of rate <= R achieves on this source."""
        rate = np.asarray(rate, dtype=np.float64)
        if self.kind == "log_loss":
            return np.maximum(self.entropy - rate, 0.0)
        d = len(self.variances)
        return self.mse_at(rate) / (2 * self.tau ** 2) + 0.5 * d * math.log(
            2 * math.pi * self.tau ** 2)

    def slope_at(self, rate) -> np.ndarray:
        """dD/dR at R: -1 (log-loss, below H(X)) or -lambda(R) / tau^2 (Gaussian)."""
        rate = np.asarray(rate, dtype=np.float64)
        if self.kind == "log_loss":
            return np.where(rate < self.entropy, -1.0, 0.0)
        return -self.water_level(rate) / self.tau ** 2

    def describe(self) -> dict:
        if self.kind == "log_loss":
            return {"kind": self.kind, "entropy": self.entropy,
                    "curve": "D(R) = max(H(X) - R, 0)"}
        return {"kind": self.kind, "variances": list(self.variances), "tau": self.tau,
                "curve": "D(R) = D_mse(R) / (2 tau^2) + (d/2) ln(2 pi tau^2), D_mse by reverse "
                         "water-filling"}


def known_curve(spec: dict | None, likelihood) -> RDCurve | None:
    """The R-D curve of a source spec (`DatasetSpec.known_answer()`) under the model's decoder
    likelihood, or None where the answer is not known for that decoder (a Gaussian decoder on
    the binary source, a Bernoulli one on the Gaussian source)."""
    rd = (spec or {}).get("rd")
    if rd is None:
        return None
    if rd["kind"] == "log_loss":
        return RDCurve("log_loss", entropy=float(rd["entropy"])) \
            if isinstance(likelihood, Bernoulli) else None
    if rd["kind"] == "gaussian_mse":
        return RDCurve("gaussian_mse", variances=tuple(float(v) for v in rd["variances"]),
                       tau=float(likelihood.tau)) if isinstance(likelihood, Gaussian) else None
    raise ValueError(f"unknown rate-distortion kind {rd['kind']!r}; expected log_loss or "
                     f"gaussian_mse")


def dataset_curve(dataset: str, likelihood) -> RDCurve | None:
    """The known R-D curve of a registered data set under `likelihood`, else None."""
    spec = REGISTRY.get(dataset)
    if spec is None or spec.known_answer is None:
        return None
    return known_curve(spec.known_answer(), likelihood)


@torch.no_grad()
def per_example(model, x: torch.Tensor, batch_size: int, beta: float = 1.0
                ) -> tuple[np.ndarray, np.ndarray]:
    """Each test example's rate and distortion (nats), one encoder sample each, in batches of
    `batch_size` (Echo draws its noise from the rest of the batch: use at least the training
    batch)."""
    model.eval()
    rates, distortions = [], []
    for idx in batches(len(x), batch_size, shuffle=False, device=x.device):
        out = model(x[idx], beta)
        rates.append(out.rate.double().cpu())
        distortions.append(out.distortion.double().cpu())
    model.train()
    return torch.cat(rates).numpy(), torch.cat(distortions).numpy()


def point_error(curve: RDCurve, rates: np.ndarray, distortions: np.ndarray) -> float:
    """The standard error of a point's excess over the curve, from its per-example rates and
    distortions: std(d_i - D'(R) r_i) / sqrt(n), D' the curve's slope at the mean rate."""
    slope = float(curve.slope_at(float(np.mean(rates))))
    n = len(rates)
    return float(np.std(distortions - slope * rates, ddof=1) / math.sqrt(n)) if n > 1 else math.nan


def check_points(curve: RDCurve, rate, distortion, error=None, *, z: float = FLAG_Z) -> dict:
    """For points (rate, distortion) with standard errors `error` (arrays or numbers): the
    curve's distortion at each rate, each point's excess over it (nats; >= 0 for any achievable
    point, up to noise) and `below`: True where the point lies below the curve by more than
    z standard errors (a wrong rate or a biased estimate)."""
    rate = np.asarray(rate, dtype=np.float64)
    distortion = np.asarray(distortion, dtype=np.float64)
    error = np.zeros_like(rate) if error is None else np.asarray(error, dtype=np.float64)
    on_curve = curve.distortion_at(rate)
    excess = distortion - on_curve
    return {"curve_distortion": on_curve, "excess": excess, "excess_se": error,
            "below": excess < -z * np.nan_to_num(error, nan=0.0)}


def check_model(model, x: torch.Tensor, curve: RDCurve, *, batch_size: int, beta: float = 1.0,
                z: float = FLAG_Z) -> dict:
    """A trained model's test point against the curve: rate, distortion, the curve's
    distortion at that rate, the excess, its standard error and whether it lies below."""
    rates, distortions = per_example(model, x, batch_size, beta)
    rate, distortion = float(rates.mean()), float(distortions.mean())
    checked = check_points(curve, rate, distortion, point_error(curve, rates, distortions), z=z)
    return {"rate": rate, "distortion": distortion,
            **{k: (bool(v) if k == "below" else float(v)) for k, v in checked.items()}}
