"""Method registry. Each module of this package registers one method of the paper's Table 2:

    @register("vae-vamp")
    def build(encoder, features, decoder, latent_dim, input_shape, *, n_pseudo=250) -> Autoencoder

so adding a baseline is adding one file here. A builder's keyword options are the method's
options (`method_options`; params.yaml sets them under `method_options: {<method>: ...}`); it
declares with `register` which it takes from the run instead (`from_run`, e.g. Echo's
batch_size), which may be searched by Optuna (`tunable`), a `check` of its options that
runs before any training, with errors in the caller's spelling, and what its rules pick for an
option left None (`resolve`, for the record of what a run used: `resolved_options`). Nothing
outside this package branches on a method's name. `build_model` assembles the shared networks
and hands them over.
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil
from dataclasses import dataclass
from typing import Callable

from ..networks import build_networks, make_likelihood
from .base import AEOutput, Autoencoder

NETWORK_ARGUMENTS = ("encoder", "features", "decoder", "latent_dim", "input_shape")


@dataclass(frozen=True)
class MethodSpec:
    builder: Callable[..., Autoencoder]
    from_run: tuple[str, ...] = ()       # options filled from the run's TrainConfig field
    tunable: tuple[str, ...] = ()        # options a sweep may search over (numbers)
    check: Callable | None = None        # check(options, names=...) -> None or ValueError
    resolve: Callable | None = None      # resolve(options) -> options, None replaced by the rule's


METHODS: dict[str, Callable[..., Autoencoder]] = {}
SPECS: dict[str, MethodSpec] = {}


def register(name: str, *, from_run: tuple[str, ...] = (), tunable: tuple[str, ...] = (),
             check: Callable | None = None, resolve: Callable | None = None):
    def add(builder: Callable[..., Autoencoder]):
        if name in METHODS:
            raise ValueError(f"method {name!r} registered twice")
        accepted = set(inspect.signature(builder).parameters) - set(NETWORK_ARGUMENTS)
        unknown = (set(from_run) | set(tunable)) - accepted
        if unknown:
            raise ValueError(f"method {name!r} declares {sorted(unknown)}, which its builder "
                             f"does not take")
        METHODS[name] = builder
        SPECS[name] = MethodSpec(builder, tuple(from_run), tuple(tunable), check, resolve)
        return builder
    return add


def _spec(method: str) -> MethodSpec:
    if method not in SPECS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    return SPECS[method]


def method_options(method: str) -> dict:
    """The options of a method and their defaults (e.g. {"clip_factor": None, ...} for echo);
    the ones it takes from the run (`from_run`) are not among them."""
    spec = _spec(method)
    params = inspect.signature(spec.builder).parameters
    return {name: p.default for name, p in params.items()
            if name not in NETWORK_ARGUMENTS and name not in spec.from_run}


def tunable_options(method: str) -> tuple[str, ...]:
    """The options a sweep may search over for this method (e.g. ("clip_factor",) for echo)."""
    return _spec(method).tunable


def run_options(method: str, training) -> dict:
    """The options a method takes from the run: {name: getattr(training, name)}."""
    return {name: getattr(training, name) for name in _spec(method).from_run}


def resolved_options(method: str, options: dict, *, training) -> dict:
    """The method's options as a model of the run's `training` settings uses them: its
    defaults, then `options`, with what its own rules pick where a value is None (`resolve`,
    e.g. Echo's clipping factor solved for the run's batch): the values a record of the run
    holds. Its own options only, not those it takes from the run."""
    spec = _spec(method)
    given = {**method_options(method), **options}
    if spec.resolve is None:
        return given
    resolved = spec.resolve({**given, **run_options(method, training)})
    return {name: resolved[name] for name in given}


def check_method_options(method: str, options: dict, *, training=None,
                         names: dict | None = None) -> None:
    """Unknown options, and (given the run's `training` settings) the method's own rules
    (`check`), as one-line ValueErrors that name each option as `names` spells it (a
    params.yaml field, a command-line flag)."""
    spec = _spec(method)
    names = names or {}
    allowed = method_options(method)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        spelled = ", ".join(names.get(o, o) for o in unknown)
        raise ValueError(f"{spelled}: method {method!r} has no such option; its options are "
                         f"{sorted(allowed)}")
    if spec.check is not None and training is not None:
        given = {**allowed, **options,
                 **(run_options(method, training) if training is not None else {})}
        spec.check(given, names=names)


def build_model(method: str, arch: str = "conv", latent_dim: int = 32,
                input_shape: tuple[int, ...] = (1, 28, 28), *, training=None,
                likelihood=None, **options) -> Autoencoder:
    """An autoencoder of the named method; forward(x, beta) -> AEOutput(rate, distortion, loss).
    `training`: the run's TrainConfig, for the options the method takes from it.
    `likelihood`: the decoder's p(x|z), an `echo.networks.Bernoulli()` (None: the default) or
    `Gaussian(tau)`, or its name ("bernoulli", "gaussian" with tau 1), the same for every
    method."""
    spec = _spec(method)
    if not isinstance(latent_dim, int) or latent_dim < 1:
        raise ValueError(f"latent_dim must be a positive integer, got {latent_dim!r}")
    accepted = set(inspect.signature(spec.builder).parameters) - set(NETWORK_ARGUMENTS)
    unknown = set(options) - accepted
    if unknown:
        raise ValueError(f"method {method!r} does not take option(s) {sorted(unknown)}; "
                         f"it takes {sorted(accepted)}")
    if training is not None:
        options = {**run_options(method, training), **options}
    if isinstance(likelihood, str):
        likelihood = make_likelihood(likelihood)
    encoder, features, decoder = build_networks(arch, input_shape, latent_dim)
    model = spec.builder(encoder=encoder, features=features, decoder=decoder,
                         latent_dim=latent_dim, input_shape=tuple(input_shape), **options)
    if likelihood is not None:
        model.likelihood = likelihood
    return model


for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["AEOutput", "Autoencoder", "METHODS", "MethodSpec", "build_model",
           "check_method_options", "method_options", "register", "run_options",
           "tunable_options"]
