"""One autoencoder for every method: encoder body -> channel -> (marginal) -> decoder.

A method (one file in this package) only chooses the channel, the marginal and an optional
regulariser; the objective is shared:  loss = mean(distortion + beta * rate) + penalty. The
distortion -log p(x|z) is the decoder's likelihood (`likelihood`: Bernoulli by default,
Gaussian with a fixed std; echo/networks.py), set for every method by `build_model`; the rate
does not depend on it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..channels import Encoding
from ..marginals import Marginal
from ..networks import Bernoulli, Gaussian


@dataclass
class AEOutput:
    rate: Tensor          # [B] nats: exact (Echo) or the upper bound log q(z|x) - log p(z)
    distortion: Tensor    # [B] nats: -log p(x|z) under the decoder's likelihood
    loss: Tensor          # scalar: mean(distortion + beta * rate) + penalty
    z: Tensor             # [B, D]
    logits: Tensor        # like x: the decoder's output (Bernoulli logits; a Gaussian's mean)


class Autoencoder(nn.Module):
    def __init__(self, encoder: nn.Module, channel: nn.Module, decoder: nn.Module,
                 marginal: Marginal | None = None, regularizer: nn.Module | None = None,
                 likelihood: Bernoulli | Gaussian | None = None):
        super().__init__()
        if marginal is None and not getattr(channel, "exact_rate", False):
            raise ValueError(f"{type(channel).__name__} has no exact rate: give it a marginal")
        self.encoder = encoder
        self.channel = channel
        self.decoder = decoder
        self.marginal = marginal
        self.regularizer = regularizer
        # p(x|z): no parameters, so checkpoints do not change with it.
        self.likelihood = likelihood if likelihood is not None else Bernoulli()

    @property
    def has_density(self) -> bool:
        """Whether p(z) is a density, so that importance-weighted likelihoods exist."""
        return self.marginal is not None

    @property
    def rate_kind(self) -> str:
        """How the reported rate is obtained: "exact" (Echo's -log|det S(x)|, Eq. 4),
        "analytic_kl" (KL(q(z|x) || p(z)) in closed form) or "single_sample_bound" (one sample of
        log q(z|x) - log p(z)). Both of the latter estimate E_x KL(q(z|x) || p(z)), an upper
        bound on I(X;Z); the single-sample one is unbiased but noisy."""
        if getattr(self.channel, "exact_rate", False):
            return "exact"
        return self.marginal.rate_kind(self.channel)

    def encode(self, x: Tensor) -> Encoding:
        return self.channel(self.encoder(x))

    def rate(self, enc: Encoding) -> Tensor:
        return enc.rate if enc.rate is not None else self.marginal.rate(enc)

    def forward(self, x: Tensor, beta: float | Tensor = 1.0) -> AEOutput:
        enc = self.encode(x)
        rate = self.rate(enc)
        logits = self.decoder(enc.z)
        distortion = self.likelihood.nll(logits, x)
        loss = (distortion + beta * rate).mean()
        if self.regularizer is not None:
            loss = loss + self.regularizer(enc.z)
        return AEOutput(rate=rate, distortion=distortion, loss=loss, z=enc.z, logits=logits)

    @torch.no_grad()
    def iwae_bound(self, x: Tensor, k: int = 1000, chunk: int = 100) -> Tensor:
        """Importance-weighted lower bound on log p(x), k samples, per example [B] (nats).

        log (1/k) sum_i p(x|z_i) p(z_i) / q(z_i|x), z_i ~ q(z|x); computed in chunks of samples
        so memory stays at chunk x B codes. Needs a prior density: Echo's marginal has none.
        """
        if not self.has_density:
            raise ValueError("this method's marginal has no density (Echo): the IWAE bound does "
                             "not exist; report the exact-rate ELBO instead")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        h = self.encoder(x)
        weights = []
        for start in range(0, k, chunk):
            n = min(chunk, k - start)
            h_rep = h.repeat(n, *([1] * (h.dim() - 1)))           # [n*B, F]
            x_rep = x.repeat(n, *([1] * (x.dim() - 1)))
            enc = self.channel(h_rep)
            log_px = -self.likelihood.nll(self.decoder(enc.z), x_rep)
            log_w = log_px + self.marginal.log_prob(enc.z) - enc.log_q
            weights.append(log_w.view(n, x.shape[0]))
        log_w = torch.cat(weights, 0)
        return torch.logsumexp(log_w, 0) - math.log(k)
