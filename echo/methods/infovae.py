"""InfoVAE (Zhao et al. 2017) as in the paper (Sec. 4, App. B): the VAE (Gaussian encoder,
N(0, I) prior, rate = analytic KL upper bound) plus 999 * MMD(q(z) || N(0, I)) on the batch of
codes, RBF kernel; see echo/regularizers.py for the bandwidth (`mmd_bandwidth`)."""
from ..channels import GaussianChannel
from ..marginals import StandardNormal
from ..regularizers import PAPER_MMD_WEIGHT, MMDPenalty
from . import register
from .base import Autoencoder


@register("infovae")
def build(encoder, features, decoder, latent_dim, input_shape, *, mmd_weight=PAPER_MMD_WEIGHT,
          mmd_bandwidth=None) -> Autoencoder:
    return Autoencoder(encoder, GaussianChannel(features, latent_dim), decoder, StandardNormal(),
                       regularizer=MMDPenalty(latent_dim, mmd_weight, mmd_bandwidth))
