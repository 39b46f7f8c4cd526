"""IAF encoders (Kingma et al. 2016) with each marginal of the paper's Table 2: iaf-prior,
iaf-mmd, iaf-vamp and iaf-maf. The encoder is the Gaussian channel followed by 4 steps of
mean-only autoregressive flow, 3 layers of 640 units each, conditioned on the encoder features
(App. B); see echo/channels.py (IAFChannel) and echo/flows.py. Rate = single-sample
log q(z|x) - log p(z) with the flow's log-determinant: the upper bound on I(X;Z) the paper reports.

Options of every IAF method: flow_steps (4), flow_hidden (640, or a list of widths), flow_affine
(False: the paper's mean-only steps). iaf-maf uses the same settings for its marginal's flow.

iaf-vamp: what p(z) is, and why. The exact VampPrior of an IAF encoder is
    p(z) = (1/K) sum_k q_T(z | u_k),   q_T(z | u_k) = q_0(f_k^-1(z) | u_k) |det d f_k^-1 / dz|,
with f_k the flow conditioned on the features of pseudo-input u_k. Evaluating it at one code needs
the inverse of an autoregressive flow, i.e. D sequential network passes per step, for every
pseudo-input: B * K * D * steps = 100 * 250 * 32 * 4 = 3.2 million MADE evaluations per
training batch, against the 400 of the encoder's own flow (8,000 times more). We use instead the
mixture of the *base* Gaussians at the pseudo-inputs,
    p(z) = (1/K) sum_k N(z; mu(u_k), sigma(u_k)^2)   (the encoder and Gaussian heads, no flow),
which costs what the VAE's VampPrior costs. It is a normalised density with learned pseudo-inputs,
so log q(z|x) - log p(z) stays an upper bound on I(X;Z) (on average it exceeds I(X;Z) by
KL(q(z) || p(z)) >= 0) and the importance-weighted bound stays a lower bound on log p(x). What is
given up is only that p(z) is not exactly the model's own posterior at the pseudo-inputs, which
can loosen the bound; at initialisation (flows start at the identity) the two coincide.
"""
from ..channels import IAFChannel
from ..flows import PAPER_STEPS, parse_hidden
from ..marginals import MAFMarginal, StandardNormal, VampPrior
from ..regularizers import PAPER_MMD_WEIGHT, MMDPenalty
from . import register
from .base import Autoencoder


def _channel(features, latent_dim, flow_steps, flow_hidden, flow_affine) -> IAFChannel:
    return IAFChannel(features, latent_dim, steps=flow_steps, hidden=parse_hidden(flow_hidden),
                      affine=bool(flow_affine))


@register("iaf-prior")
def build_prior(encoder, features, decoder, latent_dim, input_shape, *, flow_steps=PAPER_STEPS,
                flow_hidden=640, flow_affine=False) -> Autoencoder:
    channel = _channel(features, latent_dim, flow_steps, flow_hidden, flow_affine)
    return Autoencoder(encoder, channel, decoder, StandardNormal())


@register("iaf-mmd")
def build_mmd(encoder, features, decoder, latent_dim, input_shape, *, flow_steps=PAPER_STEPS,
              flow_hidden=640, flow_affine=False, mmd_weight=PAPER_MMD_WEIGHT,
              mmd_bandwidth=None) -> Autoencoder:
    channel = _channel(features, latent_dim, flow_steps, flow_hidden, flow_affine)
    return Autoencoder(encoder, channel, decoder, StandardNormal(),
                       regularizer=MMDPenalty(latent_dim, mmd_weight, mmd_bandwidth))


@register("iaf-vamp")
def build_vamp(encoder, features, decoder, latent_dim, input_shape, *, flow_steps=PAPER_STEPS,
               flow_hidden=640, flow_affine=False, n_pseudo=250) -> Autoencoder:
    channel = _channel(features, latent_dim, flow_steps, flow_hidden, flow_affine)
    # The mixture of the channel's base Gaussians at the pseudo-inputs (see the module docstring).
    return Autoencoder(encoder, channel, decoder, VampPrior(encoder, channel, input_shape, n_pseudo))


@register("iaf-maf")
def build_maf(encoder, features, decoder, latent_dim, input_shape, *, flow_steps=PAPER_STEPS,
              flow_hidden=640, flow_affine=False) -> Autoencoder:
    channel = _channel(features, latent_dim, flow_steps, flow_hidden, flow_affine)
    marginal = MAFMarginal(latent_dim, flow_steps, parse_hidden(flow_hidden), bool(flow_affine))
    return Autoencoder(encoder, channel, decoder, marginal)
