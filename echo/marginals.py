"""Marginals p(z) for methods whose rate is the upper bound E[log q(z|x) - log p(z)].

StandardNormal (VAE, InfoVAE, IAF-Prior, IAF+MMD), VampPrior (VAE-Vamp, IAF-Vamp) and MAFMarginal
(VAE-MAF, IAF-MAF): the marginals of the paper's Table 2.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .channels import Encoding
from .flows import PAPER_HIDDEN, PAPER_STEPS, AutoregressiveFlow

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

    def rate_kind(self, channel: nn.Module) -> str:
        """How `rate` is obtained with this channel (see `Autoencoder.rate_kind`)."""
        return "single_sample_bound"


class StandardNormal(Marginal):
    def log_prob(self, z: Tensor) -> Tensor:
        return -0.5 * (z.pow(2) + LOG_2PI).sum(-1)

    def rate(self, enc: Encoding) -> Tensor:
        # A plain Gaussian encoder has the KL in closed form: same expectation, no variance.
        if enc.gaussian is not None:
            return gaussian_kl_standard_normal(*enc.gaussian)
        return super().rate(enc)

    def rate_kind(self, channel: nn.Module) -> str:
        return "analytic_kl" if getattr(channel, "gaussian_posterior", False) \
            else super().rate_kind(channel)


def gaussian_log_density(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """log N(z; mu, diag exp(logvar)) summed over the last dimension."""
    return -0.5 * ((z - mu).pow(2) * torch.exp(-logvar) + logvar + LOG_2PI).sum(-1)


# Elements of the [rows, K, D] tensor that VampPrior.log_prob builds at once (~16 MB in float32).
_VAMP_CHUNK_ELEMENTS = 1 << 22


class VampPrior(Marginal):
    """p(z) = (1/K) sum_k q(z | u_k): the encoder's Gaussian at K learned pseudo-inputs u_k
    (Tomczak & Welling 2018; 250 pseudo-inputs for binary MNIST and FMNIST, 500 for Omniglot).

    `encoder` is the model's encoder body and `posterior` a module whose `params(h)` gives the
    Gaussian (mu, logvar) of q(z|x) from the features h (GaussianChannel, or IAFChannel's base
    Gaussian, see echo/methods/iaf.py). Both are the model's own modules, shared, not copies.
    Pseudo-inputs are sigmoid(logits), so they live in the data's range [0, 1].
    """

    def __init__(self, encoder: nn.Module, posterior: nn.Module, input_shape: Sequence[int],
                 n_pseudo: int = 250):
        super().__init__()
        if isinstance(n_pseudo, bool) or not isinstance(n_pseudo, int) or n_pseudo < 1:
            raise ValueError(f"n_pseudo must be a positive integer, got {n_pseudo!r}")
        self.encoder = encoder
        self.posterior = posterior
        self.pseudo_logits = nn.Parameter(torch.randn(n_pseudo, *input_shape))

    def pseudo_inputs(self) -> Tensor:
        return torch.sigmoid(self.pseudo_logits)

    def components(self) -> tuple[Tensor, Tensor]:
        """(mu, logvar) [K, D] of the mixture components q(z | u_k)."""
        return self.posterior.params(self.encoder(self.pseudo_inputs()))

    def log_prob(self, z: Tensor) -> Tensor:
        mu, logvar = self.components()
        rows = max(1, _VAMP_CHUNK_ELEMENTS // (mu.shape[0] * mu.shape[1]))
        parts = [torch.logsumexp(gaussian_log_density(zc[:, None, :], mu, logvar), dim=1)
                 for zc in z.split(rows)]
        return torch.cat(parts) - math.log(mu.shape[0])


class MAFMarginal(Marginal):
    """p(z) by a masked autoregressive flow (Papamakarios et al. 2017): u = flow(z) in one pass,
    log p(z) = log N(u; 0, I) + log|det du/dz| (0 for the paper's mean-only steps).
    """

    def __init__(self, latent_dim: int, steps: int = PAPER_STEPS,
                 hidden: Sequence[int] = PAPER_HIDDEN, affine: bool = False):
        super().__init__()
        self.flow = AutoregressiveFlow(latent_dim, steps, hidden, affine=affine)

    def log_prob(self, z: Tensor) -> Tensor:
        u, log_det = self.flow(z)
        return -0.5 * (u.pow(2) + LOG_2PI).sum(-1) + log_det
