"""Encoder bodies and decoders shared by every method.

`conv` is the paper's architecture (App. B) for 28x28 images; `mlp` is a small fully connected
variant for small inputs (e.g. the 8x8 digits) and quick CPU runs. An encoder body maps x to a
feature vector; the method's channel turns features into a latent code; a decoder maps a code
to an output of the same shape as x, which the decoder's likelihood (`Bernoulli`: logits;
`Gaussian`: the mean) turns into the distortion -log p(x|z).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

ARCHITECTURES = ("conv", "mlp")
CONV_FEATURES = 256


class ConvEncoder(nn.Sequential):
    """Conv2D 32-5-1, 32-5-2, 64-5-1, 64-5-2 ('same'), 256-7 ('valid'), ReLU: 28x28 -> 256."""

    def __init__(self, channels: int = 1):
        super().__init__(
            nn.Conv2d(channels, 32, 5, 1, padding=2), nn.ReLU(),
            nn.Conv2d(32, 32, 5, 2, padding=2), nn.ReLU(),       # 28 -> 14
            nn.Conv2d(32, 64, 5, 1, padding=2), nn.ReLU(),
            nn.Conv2d(64, 64, 5, 2, padding=2), nn.ReLU(),       # 14 -> 7
            nn.Conv2d(64, CONV_FEATURES, 7, 1), nn.ReLU(),       # 7 -> 1 ('valid')
            nn.Flatten(),
        )


class ConvDecoder(nn.Sequential):
    """The encoder mirrored: ConvT 64-7 (valid), 64-5-1, 64-5-2, 32-5-1, 32-5-2, 32-4-1, then a
    4x4 'same' convolution to one channel of Bernoulli logits (the paper's sigmoid is in the loss).
    """

    def __init__(self, latent_dim: int, channels: int = 1):
        super().__init__(
            nn.Unflatten(1, (latent_dim, 1, 1)),
            nn.ConvTranspose2d(latent_dim, 64, 7, 1), nn.ReLU(),                          # 1 -> 7
            nn.ConvTranspose2d(64, 64, 5, 1, padding=2), nn.ReLU(),
            nn.ConvTranspose2d(64, 64, 5, 2, padding=2, output_padding=1), nn.ReLU(),     # -> 14
            nn.ConvTranspose2d(64, 32, 5, 1, padding=2), nn.ReLU(),
            nn.ConvTranspose2d(32, 32, 5, 2, padding=2, output_padding=1), nn.ReLU(),     # -> 28
            # A stride-1 'same' transposed convolution is a convolution with a flipped kernel;
            # Keras pads an even kernel of 4 by 1 before and 2 after, explicit here because
            # PyTorch's padding="same" copies the input to do so.
            nn.ZeroPad2d((1, 2, 1, 2)), nn.Conv2d(32, 32, 4), nn.ReLU(),
            nn.ZeroPad2d((1, 2, 1, 2)), nn.Conv2d(32, channels, 4),
        )


class MLPEncoder(nn.Sequential):
    def __init__(self, input_shape: tuple[int, ...], hidden: tuple[int, ...] = (512, 256)):
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        super().__init__(*layers)
        self.out_features = width


class MLPDecoder(nn.Sequential):
    def __init__(self, latent_dim: int, input_shape: tuple[int, ...],
                 hidden: tuple[int, ...] = (256, 512)):
        layers: list[nn.Module] = []
        width = latent_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers += [nn.Linear(width, math.prod(input_shape)), nn.Unflatten(1, tuple(input_shape))]
        super().__init__(*layers)


def fan_in(layer: nn.Module) -> float:
    """The number of inputs that reach one output unit of a linear, convolutional or transposed
    convolutional layer. A strided transposed convolution reaches each output pixel with only
    1/stride^2 of its kernel taps, so its fan-in is in_channels * k_h * k_w / (s_h * s_w);
    PyTorch's own `kaiming_*_(mode="fan_in")` counts out_channels * k_h * k_w for it instead."""
    weight = layer.weight
    if isinstance(layer, nn.ConvTranspose2d):
        stride = layer.stride[0] * layer.stride[1]
        return weight.shape[0] * weight.shape[2] * weight.shape[3] / stride
    return float(weight[0].numel())


@torch.no_grad()
def init_signal_preserving(network: nn.Module, *, relu_after_last: bool = False,
                           fan_in_of: dict | None = None) -> nn.Module:
    """He (Kaiming) normal weights and zero biases, so that signals keep their scale through the
    ReLU stacks at initialisation: std = gain / sqrt(fan_in), gain sqrt(2) for a layer followed
    by a ReLU and 1 for a last, linear layer (`relu_after_last=True` for an encoder body).
`fan_in_of` overrides `fan_in(layer)` where the input size matters (a transposed convolution
of a 1x1 input reaches each output pixel with one tap per channel, not k_h * k_w / s^2).

    Why (docs/methods.md, "Why the conv models did not learn"): with PyTorch's default init (and
    with Keras' Glorot-uniform, the authors' choice) the paper's conv nets shrink the signal at
    every layer: encoder features vary across images by ~1e-3 and the decoder's logits across
    codes by ~4e-5, so early on the decoder cannot use a code and the distortion gives the
    encoder almost no gradient. The model, its objective and the exact rate are unchanged: only
    the starting point of training is.
    """
    layers = [m for m in network.modules()
              if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d))]
    for i, layer in enumerate(layers):
        linear = i == len(layers) - 1 and not relu_after_last
        gain = 1.0 if linear else math.sqrt(2.0)
        fans = (fan_in_of or {}).get(layer) or fan_in(layer)
        layer.weight.normal_(0.0, gain / math.sqrt(fans))
        if layer.bias is not None:
            layer.bias.zero_()
    return network


def build_networks(arch: str, input_shape: tuple[int, ...], latent_dim: int
                   ) -> tuple[nn.Module, int, nn.Module]:
    """(encoder body, its feature width, decoder) for an architecture name, both initialised
    by `init_signal_preserving`."""
    input_shape = tuple(int(s) for s in input_shape)
    if arch == "conv":
        if len(input_shape) != 3 or input_shape[1:] != (28, 28):
            raise ValueError(f"arch='conv' is the paper's network for [C, 28, 28] images, got "
                             f"input_shape={input_shape}; use arch='mlp' for other sizes")
        decoder = ConvDecoder(latent_dim, input_shape[0])    # decoder[1]: ConvT of the 1x1 code
        return (init_signal_preserving(ConvEncoder(input_shape[0]), relu_after_last=True),
                CONV_FEATURES,
                init_signal_preserving(decoder, fan_in_of={decoder[1]: latent_dim}))
    if arch == "mlp":
        encoder = init_signal_preserving(MLPEncoder(input_shape), relu_after_last=True)
        return (encoder, encoder.out_features,
                init_signal_preserving(MLPDecoder(latent_dim, input_shape)))
    raise ValueError(f"unknown arch {arch!r}; choose one of {ARCHITECTURES}")


def bernoulli_nll(logits: Tensor, x: Tensor) -> Tensor:
    """Distortion: Bernoulli negative log-likelihood in nats, summed over pixels, shape [B]."""
    return nn.functional.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)


def gaussian_nll(mean: Tensor, x: Tensor, tau: float) -> Tensor:
    """Distortion: negative log-likelihood (nats) of x under N(mean, tau^2 I), summed over the
    d values of an example, shape [B]: ||x - mean||^2 / (2 tau^2) + (d / 2) log(2 pi tau^2).
    The constant keeps D + rate a proper bound on -log p(x) (a density, so it may be < 0)."""
    d = math.prod(x.shape[1:])
    return (x - mean).pow(2).flatten(1).sum(1) / (2 * tau * tau) + \
        0.5 * d * math.log(2 * math.pi * tau * tau)


# The decoder's likelihood p(x|z): what the decoder's output means and what the distortion is.
# A data set declares its own (echo.data.DatasetSpec.likelihood, .tau); a run may override it
# (TrainConfig.likelihood, .gaussian_tau). The rate never depends on it.
LIKELIHOODS = ("bernoulli", "gaussian")
DEFAULT_TAU = 1.0           # the Gaussian decoder's std where neither data set nor run gives one


@dataclass(frozen=True)
class Bernoulli:
    """Independent Bernoulli values in [0, 1] (binary, or grey levels as targets of a
    cross-entropy); the decoder outputs logits."""
    name = "bernoulli"

    def nll(self, output: Tensor, x: Tensor) -> Tensor:
        return bernoulli_nll(output, x)

    def mean(self, output: Tensor) -> Tensor:
        return torch.sigmoid(output)

    def describe(self) -> dict:
        return {"likelihood": self.name}

    def check_data(self, x: Tensor, where: str) -> None:
        """Bernoulli targets must lie in [0, 1]; one line naming `where` and the fix."""
        if len(x) and (float(x.min()) < 0 or float(x.max()) > 1):
            raise ValueError(f"{where} has values outside [0, 1] (min {float(x.min()):.4g}, max "
                             f"{float(x.max()):.4g}), which a Bernoulli decoder cannot model: "
                             f"set likelihood='gaussian' (params.yaml train.likelihood: "
                             f"gaussian; --likelihood gaussian)")


@dataclass(frozen=True)
class Gaussian:
    """x ~ N(g(z), tau^2 I) with a fixed, stated tau: the squared-error distortion
    ||x - g(z)||^2 / (2 tau^2) plus its constant; the decoder outputs the mean g(z)."""
    tau: float = DEFAULT_TAU
    name = "gaussian"

    def __post_init__(self):
        if not (isinstance(self.tau, (int, float)) and not isinstance(self.tau, bool)
                and math.isfinite(self.tau) and self.tau > 0):
            raise ValueError(f"gaussian_tau must be a number > 0 (the Gaussian decoder's std), "
                             f"got {self.tau!r}")

    def nll(self, output: Tensor, x: Tensor) -> Tensor:
        return gaussian_nll(output, x, self.tau)

    def mean(self, output: Tensor) -> Tensor:
        return output

    def describe(self) -> dict:
        return {"likelihood": self.name, "tau": self.tau}

    def check_data(self, x: Tensor, where: str) -> None:
        """Any finite values."""


def make_likelihood(name: str = "bernoulli", tau: float | None = None) -> Bernoulli | Gaussian:
    """The likelihood called `name` (LIKELIHOODS); `tau` is the Gaussian's std (None:
    DEFAULT_TAU) and must not be given for a Bernoulli."""
    if name == "bernoulli":
        if tau is not None:
            raise ValueError(f"gaussian_tau={tau!r} is set but likelihood='bernoulli' has no "
                             f"variance; drop gaussian_tau or set likelihood='gaussian'")
        return Bernoulli()
    if name == "gaussian":
        return Gaussian(DEFAULT_TAU if tau is None else tau)
    raise ValueError(f"unknown likelihood {name!r}; choose one of {list(LIKELIHOODS)}")


def pixel_marginal_nll(x_train: Tensor, x_test: Tensor) -> float:
    """Mean distortion (nats) on `x_test` of the best decoder that ignores its code: independent
    Bernoulli pixels at the training set's pixel means. A model whose code carries nothing
    cannot beat it on average, so "distortion well below this" is what "it learned" means."""
    p = x_train.flatten(1).double().mean(0).clamp(1e-6, 1 - 1e-6)
    x = x_test.flatten(1).double()
    return float(-(x * p.log() + (1 - x) * (1 - p).log()).sum(1).mean())
