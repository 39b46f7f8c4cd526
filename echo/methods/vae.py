"""VAE: diagonal Gaussian encoder, N(0, I) prior; the rate is KL(q(z|x) || N(0, I))."""
from ..channels import GaussianChannel
from ..marginals import StandardNormal
from . import register
from .base import Autoencoder


@register("vae")
def build(encoder, features, decoder, latent_dim, input_shape) -> Autoencoder:
    return Autoencoder(encoder, GaussianChannel(features, latent_dim), decoder, StandardNormal())
