"""Method registry. Each module of this package registers one method of the paper's Table 2:

    @register("vae")
    def build(encoder, features, decoder, latent_dim, input_shape, **options) -> Autoencoder

so adding a baseline is adding one file here. `build_model` assembles the shared networks and
hands them to the method.
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import Callable

from ..networks import build_networks
from .base import AEOutput, Autoencoder

METHODS: dict[str, Callable[..., Autoencoder]] = {}


def register(name: str):
    def add(builder: Callable[..., Autoencoder]):
        if name in METHODS:
            raise ValueError(f"method {name!r} registered twice")
        METHODS[name] = builder
        return builder
    return add


def build_model(method: str, arch: str = "conv", latent_dim: int = 32,
                input_shape: tuple[int, ...] = (1, 28, 28), **options) -> Autoencoder:
    """An autoencoder of the named method; forward(x, beta) -> AEOutput(rate, distortion, loss)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    if not isinstance(latent_dim, int) or latent_dim < 1:
        raise ValueError(f"latent_dim must be a positive integer, got {latent_dim!r}")
    builder = METHODS[method]
    accepted = set(inspect.signature(builder).parameters) - {
        "encoder", "features", "decoder", "latent_dim", "input_shape"}
    unknown = set(options) - accepted
    if unknown:
        raise ValueError(f"method {method!r} does not take option(s) {sorted(unknown)}; "
                         f"it takes {sorted(accepted)}")
    encoder, features, decoder = build_networks(arch, input_shape, latent_dim)
    return builder(encoder=encoder, features=features, decoder=decoder, latent_dim=latent_dim,
                   input_shape=tuple(input_shape), **options)


def method_options(method: str) -> set[str]:
    """The keyword options a method's builder accepts (e.g. clip_factor for echo)."""
    params = inspect.signature(METHODS[method]).parameters
    return set(params) - {"encoder", "features", "decoder", "latent_dim", "input_shape"}


for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["AEOutput", "Autoencoder", "METHODS", "build_model", "method_options", "register"]
