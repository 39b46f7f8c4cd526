"""VAE-Vamp: Gaussian encoder with the VampPrior marginal (Tomczak & Welling 2018), a mixture of
the encoder at `n_pseudo` learned pseudo-inputs (250 in the paper for binary MNIST and FMNIST,
500 for Omniglot). Rate = single-sample log q(z|x) - log p(z), an upper bound on I(X;Z)."""
from ..channels import GaussianChannel
from ..marginals import VampPrior
from . import register
from .base import Autoencoder


@register("vae-vamp")
def build(encoder, features, decoder, latent_dim, input_shape, *, n_pseudo=250) -> Autoencoder:
    channel = GaussianChannel(features, latent_dim)
    return Autoencoder(encoder, channel, decoder, VampPrior(encoder, channel, input_shape, n_pseudo))
