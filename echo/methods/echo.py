"""Echo: exact-rate autoencoder (the paper's method). No marginal: the rate is -log|det S|."""
from ..channels import EchoChannel
from . import register
from .base import Autoencoder


@register("echo")
def build(encoder, features, decoder, latent_dim, input_shape, *, clip_factor=None, d_max=None,
          replace=False, batch_size=100) -> Autoencoder:
    channel = EchoChannel(features, latent_dim, clip_factor=clip_factor, d_max=d_max,
                          replace=replace, batch_size=batch_size)
    return Autoencoder(encoder, channel, decoder)
