"""Encoder bodies and decoders shared by every method.

`conv` is the paper's architecture (App. B) for 28x28 images; `mlp` is a small fully connected
variant for small inputs (e.g. the 8x8 digits) and quick CPU runs. An encoder body maps x to a
feature vector; the method's channel turns features into a latent code; a decoder maps a code
to Bernoulli logits of the same shape as x.
"""
from __future__ import annotations

import math

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


def build_networks(arch: str, input_shape: tuple[int, ...], latent_dim: int
                   ) -> tuple[nn.Module, int, nn.Module]:
    """(encoder body, its feature width, decoder) for an architecture name."""
    input_shape = tuple(int(s) for s in input_shape)
    if arch == "conv":
        if len(input_shape) != 3 or input_shape[1:] != (28, 28):
            raise ValueError(f"arch='conv' is the paper's network for [C, 28, 28] images, got "
                             f"input_shape={input_shape}; use arch='mlp' for other sizes")
        return ConvEncoder(input_shape[0]), CONV_FEATURES, ConvDecoder(latent_dim, input_shape[0])
    if arch == "mlp":
        encoder = MLPEncoder(input_shape)
        return encoder, encoder.out_features, MLPDecoder(latent_dim, input_shape)
    raise ValueError(f"unknown arch {arch!r}; choose one of {ARCHITECTURES}")


def bernoulli_nll(logits: Tensor, x: Tensor) -> Tensor:
    """Distortion: Bernoulli negative log-likelihood in nats, summed over pixels, shape [B]."""
    return nn.functional.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)
