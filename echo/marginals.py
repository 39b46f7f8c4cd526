"""Marginals p(z) for methods whose rate is the upper bound E[log q(z|x) - log p(z)]."""
from __future__ import annotations

import math

from torch import Tensor, nn

from .channels import Encoding

LOG_2PI = math.log(2 * math.pi)


def gaussian_kl_standard_normal(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, diag exp(logvar)) || N(0, I)) in nats, per example, shape [B]."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)


class Marginal(nn.Module):
    """A density p(z). `rate` is the single-sample estimate log q(z|x) - log p(z)."""

    def log_prob(self, z: Tensor) -> Tensor:
        raise NotImplementedError

    def rate(self, enc: Encoding) -> Tensor:
        return enc.log_q - self.log_prob(enc.z)


class StandardNormal(Marginal):
    def log_prob(self, z: Tensor) -> Tensor:
        return -0.5 * (z.pow(2) + LOG_2PI).sum(-1)

    def rate(self, enc: Encoding) -> Tensor:
        # A plain Gaussian encoder has the KL in closed form: same expectation, no variance.
        if enc.gaussian is not None:
            return gaussian_kl_standard_normal(*enc.gaussian)
        return super().rate(enc)
