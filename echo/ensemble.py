"""Many models per process: K configurations of one architecture trained as one vectorised model.

A rate-distortion sweep trains many small models; on a GPU each one alone is far too small to
fill the chip. `Ensemble` stacks the parameters of K autoencoders of the same method and
architecture (`torch.func.stack_module_state`) and runs them with `functional_call` under
`vmap(randomness="different")`:

- members are independent: the ensemble loss is the sum of the member losses, so the gradient of
  member k's parameters is the gradient of its own loss; nothing mixes across members (the Echo
  noise of member k is built from member k's own batch);
- each member draws its own noise (Echo orderings, Gaussian samples) and, in `fit_ensemble`,
  its own batch order, so a member is distributed exactly like a separate run of `echo.train.fit`
  with the same config (its initial weights are even the same: built from the same seed);
- Adam on a stacked parameter is elementwise, so its moment estimates for slice k depend only on
  member k's gradients: K separate optimiser states in one (checked in tests/test_ensemble.py).
  All members share the learning rate and its schedule; they may differ in beta and seed.

`fit_ensemble(config, betas=..., seeds=...)` is `fit` for K members, on the same loop
(echo/loop.py): one data set on the device, per-member metrics and checkpoints (which
`echo.train.load_model` reads and `fit_ensemble(..., resume=...)` continues from), and a member
whose loss turns non-finite stops alone while the others go on.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from .checkpoint import write_run
from .compiling import compile_model
from .loop import train_members
from .methods import Autoencoder
from .metrics import batches, mean_metrics
from .settings import TrainConfig
from .train import FitResult


@dataclass
class EnsembleOutput:
    loss: Tensor          # scalar: sum of the member losses (so member gradients stay separate)
    member_loss: Tensor   # [K]
    rate: Tensor          # [K, B] nats
    distortion: Tensor    # [K, B] nats
    z: Tensor             # [K, B, D] codes


STRATEGIES = ("auto", "vmap", "loop", "streams")


def default_strategy(device: str | torch.device) -> str:
    """What strategy="auto" runs: one CUDA stream per member on CUDA (the fastest on an H200,
    docs/performance.md), a loop over members elsewhere."""
    return "streams" if torch.device(device).type == "cuda" else "loop"


def _member_step(template: nn.Module, params: dict, buffers: dict, x: Tensor, beta: Tensor):
    out = functional_call(template, (params, buffers), (x, beta))
    return out.loss, out.rate, out.distortion, out.z


class Ensemble(nn.Module):
    """K autoencoders of one method and architecture with stacked parameters.

    strategy: "vmap" runs the K members as one batched computation (`vmap`, which turns the
    convolutions into grouped ones): the point on a GPU, where one small model leaves the chip
    idle. "loop" runs the members one after the other on their slices of the stacked
    parameters: on a CPU, already busy with one model, grouped convolutions are slower than
    K plain ones (docs/performance.md). "streams": the loop with member k's forward (and so,
    by autograd's rule, its backward) on CUDA stream k, so that the K small models run side by
    side on one GPU, each with plain (not grouped) kernels; the loop on a CPU. "auto": streams
    on CUDA, loop elsewhere. All give each member its own noise and the same per-member
    computation.
    compile: `torch.compile` the vmapped step on CUDA (eager elsewhere or if it fails).
    """

    def __init__(self, models: Sequence[Autoencoder], betas: Sequence[float], *,
                 strategy: str = "auto", compile: bool = False):
        super().__init__()
        if len(models) < 1 or len(models) != len(betas):
            raise ValueError(f"an ensemble needs one beta per model, got {len(models)} models "
                             f"and {len(betas)} betas")
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        shapes = [[(n, p.shape) for n, p in m.named_parameters()] for m in models]
        if any(s != shapes[0] for s in shapes):
            raise ValueError("ensemble members must share one architecture (same method, arch, "
                             "latent_dim and method options)")
        for b in betas:
            if not (math.isfinite(b) and b >= 0):
                raise ValueError(f"beta must be a finite number >= 0, got {b!r}")
        params, buffers = stack_module_state(list(models))
        self.k = len(models)
        self.strategy = strategy
        self.compile = compile
        self.param_names = list(params)
        self.buffer_names = list(buffers)
        # Stacked leaves [K, ...]; a ParameterList because parameter names may not hold dots.
        self.stacked = nn.ParameterList([nn.Parameter(params[n].detach().clone())
                                         for n in self.param_names])
        for i, name in enumerate(self.buffer_names):
            self.register_buffer(f"stacked_buffer_{i}", buffers[name].clone())
        self.register_buffer("betas", torch.tensor([float(b) for b in betas]))
        # A stateless template (its own tensors are never used: functional_call swaps them in).
        # Kept out of the module tree so that .parameters(), .to() and state_dict skip it.
        object.__setattr__(self, "_template", copy.deepcopy(models[0]).to("meta"))
        # The member structure (non-tensor settings such as Echo's clip factor) for unstacking.
        object.__setattr__(self, "_member_template", copy.deepcopy(models[0]).cpu())
        self._vmapped: dict[bool, Callable] = {}
        self._streams: list = []

    @classmethod
    def build(cls, method: str, betas: Sequence[float], *, seeds: Sequence[int] | int = 0,
              arch: str = "conv", latent_dim: int = 32, input_shape=(1, 28, 28),
              device="cpu", strategy: str = "auto", compile: bool = False,
              **options) -> "Ensemble":
        """K members of `method`, member k initialised from `torch.manual_seed(seeds[k])`."""
        from .methods import build_model
        seeds = [seeds] * len(betas) if isinstance(seeds, int) else list(seeds)
        if len(seeds) != len(betas):
            raise ValueError(f"got {len(betas)} betas but {len(seeds)} seeds")
        models = []
        for seed in seeds:
            torch.manual_seed(seed)
            models.append(build_model(method, arch=arch, latent_dim=latent_dim,
                                      input_shape=input_shape, **options))
        return cls(models, betas, strategy=strategy, compile=compile).to(device)

    def train(self, mode: bool = True) -> "Ensemble":
        super().train(mode)
        self._template.train(mode)          # functional_call runs the template's modules
        return self

    def resolved_strategy(self) -> str:
        return self.strategy if self.strategy != "auto" else default_strategy(self.betas.device)

    def _state(self) -> tuple[dict, dict]:
        params = dict(zip(self.param_names, self.stacked))
        buffers = {n: getattr(self, f"stacked_buffer_{i}") for i, n in enumerate(self.buffer_names)}
        return params, buffers

    def _vmapped_fn(self, batched_x: bool) -> Callable:
        """vmap over members of (params, buffers, x, beta) -> (loss, rate, distortion, z)."""
        if batched_x not in self._vmapped:
            template = self._template

            def member(params, buffers, x, beta):
                return _member_step(template, params, buffers, x, beta)

            fn = vmap(member, in_dims=(0, 0, 0 if batched_x else None, 0),
                      randomness="different")
            if self.compile:
                fn = compile_model(fn, self.betas.device)
            self._vmapped[batched_x] = fn
        return self._vmapped[batched_x]

    def _looped(self, params: dict, buffers: dict, x: Tensor, batched_x: bool,
                streams: bool = False):
        # unbind, not t[k]: its backward stacks the K member gradients once, where K separate
        # t[k] would each scatter into a zero tensor of the full stacked size.
        params = {n: t.unbind(0) for n, t in params.items()}
        buffers = {n: t.unbind(0) for n, t in buffers.items()}

        def member(k: int):
            return _member_step(self._template, {n: t[k] for n, t in params.items()},
                                {n: t[k] for n, t in buffers.items()},
                                x[k] if batched_x else x, self.betas[k])
        if not (streams and x.is_cuda):
            outs = [member(k) for k in range(self.k)]
            return tuple(torch.stack(parts) for parts in zip(*outs))
        main = torch.cuda.current_stream(x.device)
        if len(self._streams) != self.k:
            self._streams = [torch.cuda.Stream(x.device) for _ in range(self.k)]
        outs = []
        for k, stream in enumerate(self._streams):
            stream.wait_stream(main)
            with torch.cuda.stream(stream):
                outs.append(member(k))
        for stream, out in zip(self._streams, outs):
            main.wait_stream(stream)
            for t in out:
                t.record_stream(main)      # freed on the main stream's schedule, not stream k's
        return tuple(torch.stack(parts) for parts in zip(*outs))

    def forward(self, x: Tensor, *, shared: bool = False) -> EnsembleOutput:
        """x: [K, B, ...], one batch per member; or, with shared=True, one batch [B, ...] that
        every member encodes (evaluation on a common test set)."""
        if not shared and x.shape[0] != self.k:
            raise ValueError(f"expected one batch per member, x of shape [{self.k}, B, ...], got "
                             f"{tuple(x.shape)}; pass shared=True to give all members one batch")
        params, buffers = self._state()
        if self.resolved_strategy() == "vmap":
            loss, rate, distortion, z = self._vmapped_fn(not shared)(params, buffers, x,
                                                                     self.betas)
        else:
            loss, rate, distortion, z = self._looped(params, buffers, x, not shared,
                                                     streams=self.resolved_strategy() == "streams")
        return EnsembleOutput(loss=loss.sum(), member_loss=loss, rate=rate, distortion=distortion,
                              z=z)

    def member(self, k: int) -> Autoencoder:
        """Member k as an ordinary `Autoencoder` (a copy on the CPU, detached from the stack)."""
        model = copy.deepcopy(self._member_template)
        params, buffers = self._state()
        # By name rather than load_state_dict: tied weights (VampPrior's pseudo-input encoder
        # is the encoder) appear once among the parameters but twice in a state_dict.
        with torch.no_grad():
            for name, stacked in params.items():
                model.get_parameter(name).copy_(stacked[k])
            for name, stacked in buffers.items():
                model.get_buffer(name).copy_(stacked[k])
        return model

    def load_member(self, k: int, state_dict: dict) -> None:
        """Put member k's parameters and buffers (a state_dict of `self.member(k)`) in place."""
        params, buffers = self._state()
        with torch.no_grad():
            for name, stacked in {**params, **buffers}.items():
                stacked[k].copy_(state_dict[name])

    def load_member_optimizer_states(self, optimizer: torch.optim.Adam, states: list[dict]) -> None:
        """The inverse of `member_optimizer_state`: an Adam over `self.parameters()` holding
        member k's Adam state in slice k of each stacked moment."""
        stacked = {}
        for i in states[0]["state"]:
            per_member = [s["state"][i] for s in states]
            stacked[i] = {name: (torch.stack([m[name] for m in per_member])
                                 if torch.is_tensor(v) and v.dim() > 0 else v)
                          for name, v in per_member[0].items()}
        optimizer.load_state_dict({"state": stacked, "param_groups": states[0]["param_groups"]})

    def member_optimizer_state(self, optimizer: torch.optim.Adam, k: int) -> dict:
        """Member k's slice of an Adam over `self.parameters()`: the state_dict that Adam over
        `self.member(k).parameters()` would have (parameters in the same order)."""
        full = optimizer.state_dict()
        index = {id(p): i for i, p in enumerate(self.parameters())}
        state = {}
        for p, s in optimizer.state.items():
            i = index[id(p)]
            state[i] = {name: (v[k].detach().cpu().clone() if torch.is_tensor(v) and v.dim() > 0
                               else (v.detach().cpu().clone() if torch.is_tensor(v) else v))
                        for name, v in s.items()}
        groups = [{**g, "params": list(range(len(self.param_names)))} for g in full["param_groups"]]
        return {"state": state, "param_groups": groups}


def member_metric_sums(out: EnsembleOutput) -> Tensor:
    """[K, 2]: each member's summed rate and distortion over its batch, left on the device."""
    return torch.stack([out.rate.sum(1), out.distortion.sum(1)], 1).detach()


@torch.no_grad()
def evaluate_ensemble(ensemble: Ensemble, x: Tensor, batch_size: int) -> list[dict]:
    """Per member: mean rate, distortion and -ELBO (nats) over the same data set."""
    ensemble.eval()
    sums = torch.zeros(ensemble.k, 2, dtype=torch.float64, device=x.device)
    for idx in batches(len(x), batch_size, shuffle=False, device=x.device):
        sums += member_metric_sums(ensemble(x[idx], shared=True))
    ensemble.train()
    return [mean_metrics(row, len(x)) for row in sums]


def member_configs(config: TrainConfig, betas: Sequence[float] | None,
                   seeds: Sequence[int] | None) -> list[TrainConfig]:
    """The K separate-run configs an ensemble stands for (beta and seed per member)."""
    if betas is None and seeds is None:
        raise ValueError("fit_ensemble needs betas or seeds (one per member)")
    k = len(betas) if betas is not None else len(seeds)
    betas = list(betas) if betas is not None else [config.beta] * k
    seeds = list(seeds) if seeds is not None else [config.seed] * k
    if len(betas) != len(seeds) or k < 1:
        raise ValueError(f"betas ({len(betas)}) and seeds ({len(seeds)}) must have the same "
                         f"positive length")
    return [replace(config, beta=float(b), seed=int(s)) for b, s in zip(betas, seeds)]


class _EnsembleTrainee:
    """The loop's Trainee for an ensemble: one stacked forward for all K members."""
    stacked = True

    def __init__(self, ensemble: Ensemble, x_test: Tensor, batch_size: int):
        self.ensemble, self.x_test, self.batch_size = ensemble, x_test, batch_size
        self.full_betas = ensemble.betas.clone()   # the warm-up scales them in place
        # The test evaluation stays eager: its vmap over a shared batch did not capture (H200,
        # torch 2.11: the capture was invalidated inside the Echo noise), and it is ~5% of an
        # epoch.

    def parameters(self):
        return self.ensemble.parameters()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out = self.ensemble(x)                                       # x: [K, B, ...]
        return out.loss, out.rate, out.distortion

    def scale_betas(self, fraction: float) -> None:
        torch.mul(self.full_betas, fraction, out=self.ensemble.betas)

    def evaluate(self) -> list[dict]:
        return evaluate_ensemble(self.ensemble, self.x_test, self.batch_size)

    def member_model(self, k: int) -> Autoencoder:
        return self.ensemble.member(k).to(self.x_test.device)

    def member_state(self, k: int, optimizer) -> tuple[dict, dict]:
        return (self.ensemble.member(k).state_dict(),
                self.ensemble.member_optimizer_state(optimizer, k))

    def load_members(self, models: list[dict], optimizers: list[dict], optimizer) -> None:
        for k, model in enumerate(models):
            self.ensemble.load_member(k, model)
        self.ensemble.load_member_optimizer_states(optimizer, optimizers)


def fit_ensemble(config: TrainConfig, *, betas: Sequence[float] | None = None,
                 seeds: Sequence[int] | None = None, strategy: str = "auto",
                 on_epoch: Callable[[int, list[dict | None], Callable[[], list[dict]]], None]
                 | None = None, resume: Sequence[dict] | None = None) -> list[FitResult]:
    """Train K members (one per beta and/or seed) as one ensemble; one `FitResult` per member,
    in the order given. Member k stands for `fit(replace(config, beta=betas[k], seed=seeds[k]))`.

    `on_epoch(epoch, records, state)`: the members' epoch records (keys as in `fit`, + member,
    beta, seed; None for a member that has stopped) and `state()`, the members' checkpoint
    dicts, which `resume=` continues from. A member whose training loss turns non-finite stops
    (its `FitResult.stopped` says why, its history ends before that epoch) and the others go
    on; `NonFiniteLossError` only when every member has stopped. With `config.out`, member k's
    checkpoint.pt and metrics.json go to `<out>/member_<k>/`. Set-up, resume, the optimiser
    step (`train.grad_clip` per member) and the epoch loop are `fit`'s: echo.loop.train_members."""
    configs = member_configs(config, betas, seeds)
    built = {}

    def stacked(models, device, x_test, graphs):
        built["ensemble"] = Ensemble(models, [c.beta for c in configs], strategy=strategy,
                                     compile=config.compile).to(device)
        built["trainee"] = _EnsembleTrainee(built["ensemble"], x_test, config.batch_size)
        return built["trainee"]

    try:
        trainee, members, state = train_members(
            config, configs, stacked, on_epoch=on_epoch,
            resume=None if resume is None else list(resume),
            describe=f"{config.method} ensemble of {len(configs)}")
    finally:
        if "trainee" in built:
            built["ensemble"].betas.copy_(built["trainee"].full_betas)
    results = []
    states = state() if config.out is not None else None
    for i, member in enumerate(members):
        results.append(FitResult(model=trainee.member_model(i), history=member.history,
                                 metrics=member.history[-1] if member.history else {},
                                 stopped=member.stopped))
        if states is not None:
            write_run(Path(config.out) / f"member_{i}", states[i])
    return results
