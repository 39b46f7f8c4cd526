"""Echo: exact-rate autoencoder (the paper's method). No marginal: the rate is -log|det S|.

Options: clip_factor (None: the largest r whose truncated sum is exact to float32 precision,
Sec. 5; searched by Optuna where sweep.search.method_options.echo.clip_factor is given), d_max
(Echo terms; None: batch_size - 1), replace (noise terms drawn with replacement). The batch
size comes from the run: it bounds d_max and sets the default clipping factor. f_range: k in
f = tanh(a / k), the width of tanh's linear range (Sec. 5), with the f head's initial weights
scaled by k so that f starts equally spread (docs/methods.md, "f's linear range")."""
from ..channels import EchoChannel
from ..noise import check_echo_truncation, echo_clip_factor, echo_terms
from . import register
from .base import Autoencoder


def check(options: dict, *, names: dict) -> None:
    """Echo's truncation rule (echo.noise.check_echo_truncation) on the run's options."""
    check_echo_truncation(options["batch_size"], options["d_max"], bool(options["replace"]),
                          options["clip_factor"], names=names)


def resolve(options: dict) -> dict:
    """What EchoChannel uses where an option is None: the batch's other examples as terms
    (echo.noise.echo_terms) and the clipping factor solved for that many (Sec. 5,
    echo.noise.echo_clip_factor)."""
    terms = echo_terms(options["batch_size"], options["d_max"])
    return {**options, "d_max": terms,
            "clip_factor": echo_clip_factor(terms, options["clip_factor"])}


@register("echo", from_run=("batch_size",), tunable=("clip_factor",), check=check,
          resolve=resolve)
def build(encoder, features, decoder, latent_dim, input_shape, *, clip_factor=None, d_max=None,
          replace=False, batch_size=100, f_range=1.0) -> Autoencoder:
    channel = EchoChannel(features, latent_dim, clip_factor=clip_factor, d_max=d_max,
                          replace=replace, batch_size=batch_size, f_range=f_range)
    return Autoencoder(encoder, channel, decoder)
