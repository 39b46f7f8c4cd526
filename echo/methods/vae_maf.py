"""VAE-MAF: Gaussian encoder with a masked autoregressive flow density as p(z) (App. B: 4 steps
of mean-only autoregressive flow, 3 layers of 640 units each). Rate = single-sample
log q(z|x) - log p(z), an upper bound on I(X;Z).

Options: flow_steps (4), flow_hidden (640, or a list of widths), flow_affine (False: the paper's
mean-only steps; True: affine steps with a log-determinant)."""
from ..channels import GaussianChannel
from ..flows import PAPER_STEPS, parse_hidden
from ..marginals import MAFMarginal
from . import register
from .base import Autoencoder


@register("vae-maf")
def build(encoder, features, decoder, latent_dim, input_shape, *, flow_steps=PAPER_STEPS,
          flow_hidden=640, flow_affine=False) -> Autoencoder:
    marginal = MAFMarginal(latent_dim, flow_steps, parse_hidden(flow_hidden), bool(flow_affine))
    return Autoencoder(encoder, GaussianChannel(features, latent_dim), decoder, marginal)
