"""Encoder channels: turn encoder features into a latent code z.

A channel returns an `Encoding`. The Echo channel knows its rate exactly (Eq. 4); stochastic
channels (Gaussian, IAF) return log q(z|x) and leave the rate to the method's marginal.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .flows import PAPER_HIDDEN, PAPER_STEPS, AutoregressiveFlow
from .noise import echo_clip_factor, echo_rate, echo_sample, echo_terms

LOG_2PI = math.log(2 * math.pi)


@dataclass
class Encoding:
    z: Tensor                          # [B, D] latent sample
    log_q: Tensor | None = None        # [B] log q(z|x) of this sample (stochastic channels)
    rate: Tensor | None = None         # [B] exact rate in nats (Echo)
    gaussian: tuple[Tensor, Tensor] | None = None  # (mu, logvar) when q(z|x) is a plain Gaussian


class EchoChannel(nn.Module):
    """f = tanh(Dense / k), log S = log_sigmoid(Dense) + log r; z = f + S eps (Eq. 1-3).

    r is the clipping factor (Sec. 5): by default the largest r that keeps the truncated Echo
    sum exact to float32 precision with d_max = batch_size - 1 terms.

    k is `f_range`, the width of tanh's linear range (Sec. 5: "expand the linear range of the
    tanh"; the authors' configs use tanh(a/16)). The f head's initial weights and bias are
    multiplied by k, so that f starts with the same spread whatever k (a plain tanh(a/16) on a
    default-initialised head starts f ~16 times too small for the decoder to read). Under Adam,
    whose steps do not depend on a gradient's scale, this is the same model as tanh(a) with the
    f head's learning rate divided by k (docs/methods.md, "f's linear range").
    """

    exact_rate = True

    def __init__(self, in_features: int, latent_dim: int, *, clip_factor: float | None = None,
                 d_max: int | None = None, replace: bool = False, batch_size: int = 100,
                 f_range: float = 1.0):
        super().__init__()
        if not (isinstance(f_range, (int, float)) and not isinstance(f_range, bool)
                and math.isfinite(f_range) and f_range > 0):
            raise ValueError(f"f_range must be a number > 0 (f = tanh(a / f_range)), "
                             f"got {f_range!r}")
        self.f_range = float(f_range)
        self.f_head = nn.Linear(in_features, latent_dim)
        with torch.no_grad():
            self.f_head.weight.mul_(self.f_range)
            self.f_head.bias.mul_(self.f_range)
        self.log_s_head = nn.Linear(in_features, latent_dim)
        self.d_max = d_max
        self.replace = replace
        terms = echo_terms(batch_size, d_max)
        self.clip_factor = echo_clip_factor(terms, clip_factor)
        if not 0 < self.clip_factor < 1:
            raise ValueError(f"clip_factor must lie in (0, 1), got {self.clip_factor}")
        self.log_clip = math.log(self.clip_factor)

    def heads(self, h: Tensor) -> tuple[Tensor, Tensor]:
        f = torch.tanh(self.f_head(h) / self.f_range)
        log_s = nn.functional.logsigmoid(self.log_s_head(h)) + self.log_clip
        return f, log_s

    def forward(self, h: Tensor) -> Encoding:
        f, log_s = self.heads(h)
        d_max = self.d_max
        if d_max is not None and not self.replace:
            # A short final evaluation batch has fewer others than d_max.
            d_max = min(d_max, h.shape[0] - 1)
        z = echo_sample(f, log_s, d_max=d_max, replace=self.replace, check=False)
        return Encoding(z=z, rate=echo_rate(log_s))


class GaussianChannel(nn.Module):
    """Diagonal Gaussian q(z|x) = N(mu(x), diag exp(logvar(x))), reparameterised."""

    exact_rate = False
    # q(z|x) is exactly this Gaussian, so a Gaussian prior's KL has a closed form (StandardNormal)
    gaussian_posterior = True

    def __init__(self, in_features: int, latent_dim: int):
        super().__init__()
        self.mu_head = nn.Linear(in_features, latent_dim)
        self.logvar_head = nn.Linear(in_features, latent_dim)

    def params(self, h: Tensor) -> tuple[Tensor, Tensor]:
        return self.mu_head(h), self.logvar_head(h)

    def forward(self, h: Tensor) -> Encoding:
        mu, logvar = self.params(h)
        noise = torch.randn_like(mu)
        z = mu + (0.5 * logvar).exp() * noise
        log_q = -0.5 * (noise.pow(2) + logvar + LOG_2PI).sum(-1)
        return Encoding(z=z, log_q=log_q, gaussian=(mu, logvar))


class IAFChannel(GaussianChannel):
    """Inverse autoregressive flow encoder (Kingma et al. 2016): a Gaussian sample z_0 = mu(x) +
    sigma(x) * eps, then `steps` autoregressive steps conditioned on the encoder features h:

        z_T = flow(z_0, h),   log q(z_T|x) = log q_0(z_0|x) - log|det dz_T/dz_0|

    (the log-determinant is 0 for the paper's mean-only steps). `params(h)` is the base
    Gaussian; q(z|x) itself is not Gaussian, so `Encoding.gaussian` is None and the rate is the
    single-sample log q(z|x) - log p(z).
    """

    gaussian_posterior = False

    def __init__(self, in_features: int, latent_dim: int, *, steps: int = PAPER_STEPS,
                 hidden: Sequence[int] = PAPER_HIDDEN, affine: bool = False):
        super().__init__(in_features, latent_dim)
        self.flow = AutoregressiveFlow(latent_dim, steps, hidden, context_dim=in_features,
                                       affine=affine)

    def forward(self, h: Tensor) -> Encoding:
        base = super().forward(h)
        z, log_det = self.flow(base.z, h)
        return Encoding(z=z, log_q=base.log_q - log_det)
