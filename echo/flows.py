"""Autoregressive flows for the paper's MAF marginal and IAF encoder (App. B).

"Each flow used four steps of mean only autoregressive flow, with each step consisting of three
layers of 640 units" (App. B; the authors used TensorFlow Probability's MADE template with
shift_only=True). One step maps x -> y with

    mean-only (paper):  y_i = x_i + m_i(x_<i, c)                     log|det dy/dx| = 0
    affine (option):    y_i = x_i * exp(s_i(x_<i, c)) + m_i(x_<i, c)  log|det dy/dx| = sum_i s_i

where x_<i are the coordinates before i in the step's order, c an optional context (the encoder
features, for IAF), and (m, s) come from one MADE (Germain et al. 2015). The Jacobian is
triangular in the step's order, so the log-determinant is exact. Consecutive steps reverse the
order so that every coordinate can depend on every other one after two steps.

The same step serves both flows, in the direction that costs one network pass:
- MAF density p(z) (Papamakarios et al. 2017): u = flow(z), log p(z) = log N(u; 0, I) + log-det.
- IAF posterior (Kingma et al. 2016): z_T = flow(z_0, c) with z_0 ~ N(mu(x), sigma(x)),
  log q(z_T|x) = log q_0(z_0|x) - log-det.

Why MADE is written here rather than taken from a library (evaluated: zuko 1.6, nflows 0.14,
normflows 1.7): nflows (last release 2020) and normflows (built on the same MADE) offer only
affine or spline autoregressive transforms, not the paper's shift-only step. zuko could express
it (MaskedAutoregressiveTransform with its AdditiveTransform, hidden_features=[640] * 3), but it
would add a runtime dependency to `echo/`, which the project keeps to PyTorch and numpy, for
what is ~60 lines here; and the Jacobian tests below check this code directly either way.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

PAPER_STEPS = 4
PAPER_HIDDEN = (640, 640, 640)
LOG_SCALE_BOUND = 3.0     # affine steps: |s| <= 3 (scale within e^-3..e^3) keeps training stable


class MaskedLinear(nn.Linear):
    """A linear layer whose weight is multiplied by a fixed 0/1 mask (a buffer, not trained)."""

    def __init__(self, in_features: int, out_features: int, mask: Tensor):
        super().__init__(in_features, out_features)
        self.register_buffer("mask", mask.to(self.weight.dtype))

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.weight * self.mask, self.bias)


class MADE(nn.Module):
    """Masked autoencoder for distribution estimation: outputs `n_params` values per coordinate,
    each depending only on the coordinates before it in `order` (and on the context).

    Degrees: input i has degree order[i] in 1..D; hidden units get degrees 0..D-1 in turn and see
    inputs of degree <= their own; an output of degree d sees hidden units of degree < d. Degree-0
    hidden units see only the context, so the first coordinate's output can depend on it.
    """

    def __init__(self, dim: int, hidden: Sequence[int] = PAPER_HIDDEN, *, context_dim: int = 0,
                 n_params: int = 1, order: Tensor | None = None):
        super().__init__()
        if dim < 1 or not hidden or any(h < 1 for h in hidden):
            raise ValueError(f"MADE needs dim >= 1 and positive hidden widths, got dim={dim}, "
                             f"hidden={tuple(hidden)}")
        order = torch.arange(1, dim + 1) if order is None else torch.as_tensor(order)
        if sorted(order.tolist()) != list(range(1, dim + 1)):
            raise ValueError(f"order must be a permutation of 1..{dim}, got {order.tolist()}")
        self.dim, self.n_params = dim, n_params
        self.register_buffer("order", order.clone())
        degrees = [order]
        for width in hidden:
            degrees.append(torch.arange(width) % dim)
        layers: list[nn.Module] = []
        for prev, cur in zip(degrees[:-1], degrees[1:]):
            layers.append(MaskedLinear(len(prev), len(cur), cur[:, None] >= prev[None, :]))
        self.hidden = nn.ModuleList(layers)
        out_degrees = order.repeat(n_params)                              # [n_params * D]
        self.output = MaskedLinear(hidden[-1], n_params * dim,
                                   out_degrees[:, None] > degrees[-1][None, :])
        self.context = nn.Linear(context_dim, hidden[0], bias=False) if context_dim else None
        # Start every flow at the identity (zero shift and log-scale): stable first steps.
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """[B, D] (+ context [B, C]) -> [B, n_params, D]."""
        h = self.hidden[0](x)
        if self.context is not None:
            if context is None:
                raise ValueError("this MADE was built with a context: pass context=")
            h = h + self.context(context)
        h = torch.relu(h)
        for layer in self.hidden[1:]:
            h = torch.relu(layer(h))
        return self.output(h).view(x.shape[0], self.n_params, self.dim)


class AutoregressiveStep(nn.Module):
    """One mean-only (default) or affine autoregressive step; forward -> (y, log|det dy/dx|)."""

    def __init__(self, dim: int, hidden: Sequence[int] = PAPER_HIDDEN, *, context_dim: int = 0,
                 affine: bool = False, order: Tensor | None = None):
        super().__init__()
        self.affine = affine
        self.made = MADE(dim, hidden, context_dim=context_dim, n_params=2 if affine else 1,
                         order=order)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        params = self.made(x, context)
        shift = params[:, 0]
        if not self.affine:
            return x + shift, x.new_zeros(x.shape[0])
        log_scale = LOG_SCALE_BOUND * torch.tanh(params[:, 1] / LOG_SCALE_BOUND)
        return x * log_scale.exp() + shift, log_scale.sum(-1)


class AutoregressiveFlow(nn.Module):
    """`steps` autoregressive steps with alternating (natural, reversed) orders.

    forward(x, context) -> (y, log|det dy/dx|) [B]; used as the MAF density map z -> u and as
    the IAF sampling map z_0 -> z_T.
    """

    def __init__(self, dim: int, steps: int = PAPER_STEPS, hidden: Sequence[int] = PAPER_HIDDEN,
                 *, context_dim: int = 0, affine: bool = False):
        super().__init__()
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"flow_steps must be a positive integer, got {steps!r}")
        hidden = tuple(int(h) for h in hidden)
        natural = torch.arange(1, dim + 1)
        self.steps = nn.ModuleList(
            AutoregressiveStep(dim, hidden, context_dim=context_dim, affine=affine,
                               order=natural if k % 2 == 0 else natural.flip(0))
            for k in range(steps))

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        log_det = x.new_zeros(x.shape[0])
        for step in self.steps:
            x, step_log_det = step(x, context)
            log_det = log_det + step_log_det
        return x, log_det


def parse_hidden(hidden: int | Sequence[int]) -> tuple[int, ...]:
    """Normalise a `flow_hidden` option: 640 -> (640, 640, 640) (the paper's three layers)."""
    if isinstance(hidden, bool):
        raise ValueError(f"flow_hidden must be an int or a list of ints, got {hidden!r}")
    if isinstance(hidden, int):
        hidden = (hidden,) * len(PAPER_HIDDEN)
    hidden = tuple(hidden)
    if not hidden or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden):
        raise ValueError(f"flow_hidden must be a positive int or a list of them, got {hidden!r}")
    return hidden
