"""The Echo channel: noise built from the other examples of the batch, with an exact rate.

Paper, Sec. 2: z = f(x) + S(x) eps (Eq. 1) with
    eps = sum_{l>=1} (prod_{k<l} S(x^(k))) f(x^(l))            (Eq. 2-3)
and, for diagonal S, the exact mutual information
    I(X;Z) = -E_x sum_d log S_d(x)                               (Eq. 4, Thm 2.3).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

FLOAT32_EPS = 2.0**-23


def clip_factor(d_max: int, max_abs_f: float = 1.0, eps: float = FLOAT32_EPS) -> float:
    """Largest r < 1 such that the Echo sum truncated after `d_max` terms is exact to `eps`.

    With |f| <= M and S <= r, the terms after `d_max` sum to at most M r^d_max / (1 - r)
    (paper, Sec. 5). The left-hand side grows with r, so bisection finds the r where it equals
    `eps`: d_max = 99 (batch 100, no replacement) gives r = 0.8359 as in the authors' code.

    Low-rate limit: every S_d <= r, so the Echo rate is at least `-D log r` nats for D latent
    dimensions (`echo_low_rate_limit`), whatever the encoder does; a larger d_max pushes r
    towards 1 and the limit towards 0.
    """
    if not isinstance(d_max, int) or d_max < 1:
        raise ValueError(f"d_max must be a positive integer, got {d_max!r}")
    if not max_abs_f > 0 or not math.isfinite(max_abs_f):
        raise ValueError(f"max_abs_f must be a positive finite bound on |f|, got {max_abs_f!r}")
    if not 0 < eps < 1:
        raise ValueError(f"eps must lie in (0, 1), got {eps!r}")

    def log_tail(r: float) -> float:
        return math.log(max_abs_f) + d_max * math.log(r) - math.log1p(-r)

    lo, hi = 0.0, 1.0
    if log_tail(1e-300) >= math.log(eps):
        raise ValueError(f"no clipping factor r in (0, 1) reaches eps={eps} with M={max_abs_f}")
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if log_tail(mid) < math.log(eps):
            lo = mid
        else:
            hi = mid
    return lo


def truncation_error_bound(r: float, d_max: int, max_abs_f: float = 1.0) -> float:
    """Upper bound M r^d_max / (1 - r) on the part of the Echo sum that truncation drops."""
    return max_abs_f * r**d_max / (1.0 - r)


def echo_low_rate_limit(r: float, latent_dim: int) -> float:
    """The smallest rate (nats) an Echo encoder with clipping factor r can reach: -D log r."""
    return -latent_dim * math.log(r)


def echo_rate(log_s: Tensor) -> Tensor:
    """Exact per-example rate -sum_d log S_d(x) in nats (Eq. 4 with diagonal S), shape [B]."""
    return -log_s.sum(dim=-1)


def _other_indices(batch: int, d_max: int, replace: bool, device, generator) -> Tensor:
    """For each example i, `d_max` indices of *other* examples of the batch, shape [B, d_max]."""
    if replace:
        # Uniform over the B-1 others: shift i by 1..B-1 (mod B), never landing on i itself.
        shift = torch.randint(1, batch, (batch, d_max), device=device, generator=generator)
        return (torch.arange(batch, device=device).unsqueeze(1) + shift) % batch
    # Without replacement: a random ordering of the others. Sorting iid uniform keys gives a
    # uniform permutation of 0..B-2 per row; shifting the values >= i up by one maps it onto
    # the B-1 others of row i (no in-place diagonal fill, so it also vectorises under vmap).
    keys = torch.rand(batch, batch - 1, device=device, generator=generator)
    order = keys.argsort(dim=1)[:, :d_max]
    return order + (order >= torch.arange(batch, device=device).unsqueeze(1))


def echo_noise(f: Tensor, log_s: Tensor, *, d_max: int | None = None, replace: bool = False,
               generator: torch.Generator | None = None, check: bool = True) -> Tensor:
    """The Echo noise eps of Eq. 2-3 for every example of the batch, shape [B, D].

    Vectorised over the batch: gathers the d_max noise examples of every row ([B, d_max, D],
    the largest tensor this allocates), takes the exclusive cumulative sum of log S along the
    echo order (the products prod_{k<l} S in log space) and sums the weighted f. Gradients flow
    into f and log_s of the examples used as noise.
    """
    if check:
        _validate(f, log_s, d_max, replace)
    batch = f.shape[0]
    if d_max is None:
        d_max = batch - 1
    idx = _other_indices(batch, d_max, replace, f.device, generator)
    # Memory: a few [B, d_max, D] tensors at a time (see docs/performance.md). The in-place
    # steps are safe for autograd: cumsum and subtraction save nothing, exp saves its output.
    # index_select, not log_s[idx]: its backward (index_add) is deterministic on a multi-threaded
    # CPU, advanced indexing's (index_put with accumulate) is not, and seeded runs must repeat.
    flat = idx.reshape(-1)
    log_s_echo = log_s.index_select(0, flat).view(batch, d_max, -1)  # log S(x^(1..d_max))
    # log prod_{k<l} S(x^(k)): inclusive cumsum minus the own term (an exclusive cumsum).
    weight = log_s_echo.cumsum(dim=1).sub_(log_s_echo).exp_()
    del log_s_echo
    return (weight * f.index_select(0, flat).view(batch, d_max, -1)).sum(dim=1)


def echo_sample(f: Tensor, log_s: Tensor, *, d_max: int | None = None, replace: bool = False,
                generator: torch.Generator | None = None, check: bool = True) -> Tensor:
    """Echo sample z = f + S * eps (Eq. 1) with eps from the other examples of the batch.

    f, log_s: [B, D] encoder outputs for the batch, S = exp(log_s) diagonal with S < 1.
    d_max: number of echo terms (default B-1, all others, as in the paper); without
    replacement it must be at most B-1, with replacement any positive number.
    """
    eps = echo_noise(f, log_s, d_max=d_max, replace=replace, generator=generator, check=check)
    return f + log_s.exp() * eps


def _validate(f: Tensor, log_s: Tensor, d_max: int | None, replace: bool) -> None:
    if f.dim() != 2 or log_s.dim() != 2:
        raise ValueError(f"f and log_s must be [batch, latent] matrices, got shapes "
                         f"{tuple(f.shape)} and {tuple(log_s.shape)}")
    if f.shape != log_s.shape:
        raise ValueError(f"f and log_s must have the same shape, got {tuple(f.shape)} and "
                         f"{tuple(log_s.shape)}")
    batch = f.shape[0]
    if batch < 2:
        raise ValueError(f"Echo noise needs other examples in the batch: batch size must be "
                         f">= 2, got {batch}")
    if d_max is not None:
        if isinstance(d_max, bool) or not isinstance(d_max, int) or d_max < 1:
            raise ValueError(f"d_max must be a positive integer, got {d_max!r}")
        if not replace and d_max >= batch:
            raise ValueError(f"d_max={d_max} without replacement needs d_max <= batch size - 1 "
                             f"= {batch - 1}; lower d_max, enlarge the batch or use replace=True")
    if not bool(torch.isfinite(f).all()):
        raise ValueError("f contains NaN or infinite values")
    if not bool(torch.isfinite(log_s).all()):
        raise ValueError("log_s contains NaN or infinite values")
    if bool((log_s >= 0).any()):
        raise ValueError("log_s must be < 0 everywhere (S < 1), or the Echo sum diverges "
                         "(paper Lemma 2.1); scale the sigmoid by clip_factor(d_max)")
