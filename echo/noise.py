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


def echo_terms(batch_size: int, d_max: int | None = None) -> int:
    """The number of noise terms of the truncated Echo sum (Eq. 3): `d_max`, or by default every
    other example of the batch, batch_size - 1 (as in the paper). The one rule for it."""
    return d_max if d_max is not None else batch_size - 1


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


def echo_clip_factor(terms: int, given: float | None = None) -> float:
    """The clipping factor of an Echo channel with `terms` noise terms: `given`, or by default
    the largest exact one, `clip_factor(terms)`. The one rule for it (the channel uses it, and
    a run's record says what it picked)."""
    return float(given) if given is not None else clip_factor(terms)


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


# Number of pieces the echo order is cut into by `_EchoNoise`: each piece's two [c, B, D]
# temporaries (c = ceil(d_max / 4)) total about half of B x d_max x D floats, and four pieces
# keep the kernels few and large on a GPU.
ECHO_CHUNKS = 4


def echo_noise(f: Tensor, log_s: Tensor, *, d_max: int | None = None, replace: bool = False,
               generator: torch.Generator | None = None, check: bool = True) -> Tensor:
    """The Echo noise eps of Eq. 2-3 for every example of the batch, shape [B, D].

    eps_i = sum_{l=1..d_max} w_il f(x^(j(i,l))), w_il = prod_{k<l} S(x^(j(i,k))), with j(i, .)
    the d_max other examples drawn by `_other_indices`. Gradients flow into f and log_s of the
    examples used as noise. Computed by `_EchoNoise` in pieces along the echo order, so that
    forward + backward hold at most two [ceil(d_max/4), B, D] float tensors at once, plus the
    int64 echo order and a few [B, D] ones: 0.68 x B*d_max*D floats in all at B = 100,
    d_max = 99, D = 32, where the plain vectorised `echo_noise_reference` peaks at 5.1 x
    (docs/performance.md). Once differentiable: double backward raises.
    """
    if check:
        _validate(f, log_s, d_max, replace)
    batch = f.shape[0]
    d_max = echo_terms(batch, d_max)
    order = _shifted_order(_other_indices(batch, d_max, replace, f.device, generator))
    return _EchoNoise.apply(f, log_s, order)[0]


def echo_noise_reference(f: Tensor, log_s: Tensor, *, d_max: int | None = None,
                         replace: bool = False, generator: torch.Generator | None = None,
                         check: bool = True) -> Tensor:
    """`echo_noise` in one vectorised piece with plain autograd: the reference for tests.

    Same arguments, same random draws (so the same generator seed gives the same noise up to
    rounding). Gathers the d_max noise examples of every row ([B, d_max, D]), takes the
    exclusive cumulative sum of log S along the echo order (the products prod_{k<l} S in log
    space) and sums the weighted f. Peak memory over forward + backward ~5 x B*d_max*D floats:
    autograd saves the weights and the gathered f, and cumsum's backward (flip, cumsum, flip)
    holds three such tensors at once.
    """
    if check:
        _validate(f, log_s, d_max, replace)
    batch = f.shape[0]
    d_max = echo_terms(batch, d_max)
    return _reference_noise(f, log_s, _other_indices(batch, d_max, replace, f.device, generator))


def _reference_noise(f: Tensor, log_s: Tensor, idx: Tensor) -> Tensor:
    """`echo_noise_reference` for given echo indices idx [B, d_max] (`_other_indices`)."""
    batch, d_max = idx.shape
    # The in-place steps are safe for autograd: cumsum and subtraction save nothing, exp saves
    # its output. index_select, not log_s[idx]: its backward (index_add) is deterministic on a
    # multi-threaded CPU, advanced indexing's (index_put with accumulate) is not.
    flat = idx.reshape(-1)
    log_s_echo = log_s.index_select(0, flat).view(batch, d_max, -1)  # log S(x^(1..d_max))
    # log prod_{k<l} S(x^(k)): inclusive cumsum minus the own term (an exclusive cumsum).
    weight = log_s_echo.cumsum(dim=1).sub_(log_s_echo).exp_()
    del log_s_echo
    return (weight * f.index_select(0, flat).view(batch, d_max, -1)).sum(dim=1)


def _shifted_order(idx: Tensor) -> Tensor:
    """The echo order [B, d_max] as `_EchoNoise` reads it: position-major and shifted by one.

    Row l+1 of the result is j(., l) (the noise example at echo position l of every row), row 0
    repeats row 1 as a placeholder. Position-major, a piece of the echo order is a contiguous
    block of rows and its gathered [c, B, D] values are contiguous too, so the cumulative sum
    runs over whole [B, D] slabs. The shift lets one gather fetch log S at positions
    a-1 .. b-2, exactly what the exclusive cumsum over positions a .. b-1 needs (_EchoNoise).
    """
    return torch.cat([idx[:, :1].t(), idx.t()]).contiguous()   # contiguous: a no-op here


def _pieces(d_max: int) -> list[tuple[int, int]]:
    """[a, b) bounds of the pieces of the echo order 0 .. d_max-1 (at most ECHO_CHUNKS)."""
    size = -(-d_max // min(ECHO_CHUNKS, d_max))
    return [(a, min(a + size, d_max)) for a in range(0, d_max, size)]


def _gathered_log_s(log_s: Tensor, order: Tensor, a: int, b: int) -> Tensor:
    """log S(x^(j(i,k))) at the echo positions k = a-1 .. b-2, [b-a, B, D] (`_shifted_order`).

    Row 0 (position a-1, a placeholder when a = 0) is then replaced by the log-prefix
    sum_{k<a} log S_k, and the inclusive cumsum of the rows is the exclusive one of Eq. 2-3
    over the piece: row l-a becomes sum_{k<l} log S_k = log w_il, for l = a .. b-1.
    """
    batch, dim = log_s.shape
    return log_s.index_select(0, order[a:b].reshape(-1)).view(b - a, batch, dim)


def _exp_weights(log_weight: Tensor) -> Tensor:
    """exp of the log-weights, in place, raising those below the smallest normal float to it.

    Why: once prod_{k<l} S falls below ~1e-38 (float32; log < -87.3), exp returns denormals or
    0, and the CPU's vectorised exp takes a slow path for them (and for arguments right at the
    edge): ~15x slower, which made exp most of the time of a step at d_max = 99. The floor is
    e^0.5 x the smallest normal number, 1.9e-38 in float32 (3.7e-308 in float64), so eps moves
    by less than d_max * max|f| times that, far below the rounding of any eps an encoder gives.
    """
    floor = math.log(torch.finfo(log_weight.dtype).tiny) + 0.5
    return log_weight.clamp_min_(floor).exp_()   # clamp_min_: clamp_ has no vmap rule


class _EchoNoise(torch.autograd.Function):
    """eps_i = sum_l w_il f_{j(i,l)} (Eq. 2-3) in ECHO_CHUNKS pieces along the echo order l.

    inputs: f, log_s [B, D] and the echo order from `_shifted_order` ([d_max + 1, B] int64,
    drawn outside, so the Function itself is deterministic). outputs: eps [B, D] and the
    log-prefixes at the start of each piece ([pieces, B, D], not differentiable), which the
    backward needs to rebuild the weights piece by piece.

    Memory. The forward holds at most two [c, B, D] tensors of a piece at a time (log-weights
    turned into weights in place, and the gathered f), c = ceil(d_max / 4), and carries the
    running log-prefix [B, D] across pieces. Autograd keeps only f, log_s, the echo order and
    the prefixes. The backward recomputes each piece's weights (the same ops on the same
    inputs, so the same values bit for bit), going from the last piece to the first with the
    suffix sum R_i = sum_{l beyond the piece} w_il f_il. The gradients, with g = d loss/d eps:
        d/d f_{j(i,l)}     += g_i w_il
        d/d log_s_{j(i,k)} += g_i sum_{l>k} w_il f_il     (an exclusive reverse cumsum)
    scattered with index_add (deterministic on CPU; the reference's index_select backward is
    the same op). Double backward is not supported (no method needs it): the backward runs
    as `once_differentiable`, and differentiating it raises.
    """

    generate_vmap_rule = True   # works under torch.func.vmap, as echo/ensemble.py uses it

    @staticmethod
    def forward(f: Tensor, log_s: Tensor, order: Tensor) -> tuple[Tensor, Tensor]:
        batch, dim = f.shape
        eps = last = None
        prefixes = []
        for a, b in _pieces(order.shape[0] - 1):
            rows = _gathered_log_s(log_s, order, a, b)
            if last is None:
                rows[0].zero_()          # empty product before position 0: w_i1 = 1
            else:
                rows[0].add_(last)       # log S_{a-1} + log w_{i,a-1} = log-prefix of the piece
            prefixes.append(rows[0].clone())
            # Out of place (the gathered rows die here): cumsum_ has no vmap batching rule and
            # would run member by member under torch.func.vmap.
            weight = rows.cumsum(0)
            del rows
            last = weight[-1].clone()
            # w_il f_il, multiplied into the gathered f rather than into the weights: exp_ keeps
            # its output for autograd, and under torch.compile(vmap(...)) dynamo inlines this
            # forward and differentiates it as ordinary ops, so it must stay autograd-safe.
            term = f.index_select(0, order[a + 1:b + 1].reshape(-1)).view(b - a, batch, dim)
            part = term.mul_(_exp_weights(weight)).sum(0)
            del weight, term
            eps = part if eps is None else eps.add_(part)
        return eps, torch.stack(prefixes)

    @staticmethod
    def setup_context(ctx, inputs, output):
        f, log_s, order = inputs
        _, prefixes = output
        ctx.mark_non_differentiable(prefixes)
        # No zero-filled [pieces, B, D] gradient for `prefixes` in the backward (it is None).
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(f, log_s, order, prefixes)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_eps: Tensor, _grad_prefixes) -> tuple[Tensor | None, Tensor | None, None]:
        if grad_eps is None:   # an undefined (all-zero) gradient: grads materialize to None
            return None, None, None
        f, log_s, order, prefixes = ctx.saved_tensors
        batch, dim = f.shape
        want_f, want_s = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_f = torch.zeros_like(f) if want_f else None
        minus_grad_s = torch.zeros_like(log_s) if want_s else None   # negated, see below
        g = grad_eps.unsqueeze(0)
        suffix = None   # R_i: sum of w_il f_il over the pieces after this one
        pieces = _pieces(order.shape[0] - 1)
        for p in reversed(range(len(pieces))):
            a, b = pieces[p]
            where = order[a + 1:b + 1].reshape(-1)
            rows = _gathered_log_s(log_s, order, a, b)
            rows[0].copy_(prefixes[p])   # as in the forward: the same weights, bit for bit
            weight = _exp_weights(rows.cumsum(0))
            del rows
            term = f.index_select(0, where).view(b - a, batch, dim).mul_(weight)  # w_il f_il
            if want_f:
                # Out-of-place index_add ([B, D], small): in place would fail under vmap when
                # only the gradient is batched.
                grad_f = grad_f.index_add(0, where, weight.mul_(g).view(-1, dim))
            del weight
            if want_s:
                # sum_{l>k} t_l = (R + sum of the piece) - (inclusive cumsum up to k), in place
                # of autograd's flip-cumsum-flip; the difference is off by about one ulp of
                # R + sum |t|, where |t_l| <= max|f| prod S decays geometrically along l.
                # d/d log_s_{j(i,k)} = g_i sum_{l>k} t_l = -(cumsum - total) g_i: accumulated
                # negated (two passes over the piece, not three) and negated once at the end.
                term = term.cumsum(0)   # not cumsum_ (no vmap rule); `weight` is gone
                total = term[-1].clone() if suffix is None else suffix + term[-1]
                minus_grad_s = minus_grad_s.index_add(0, where,
                                                      term.sub_(total).mul_(g).view(-1, dim))
                suffix = total
            del term
        return grad_f, None if minus_grad_s is None else minus_grad_s.neg(), None


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


# check_echo_truncation's `clip_factor` argument hides the function of that name.
_solve_clip_factor = clip_factor


def check_echo_truncation(batch_size: int, d_max: int | None = None, replace: bool = False,
                          clip_factor: float | None = None, *, names: dict | None = None) -> None:
    """Echo's truncation rule, the one check behind params.yaml and `python -m echo.train`:
    without replacement the d_max noise terms are other examples of the batch (d_max <
    batch_size), and the clipping factor may not exceed the r solving M r^d_max / (1 - r) =
    2^-23 (`echo.clip_factor`), above which the dropped tail of the sum is not negligible.

    Raises a one-line ValueError; `names` maps "d_max", "batch_size", "clip_factor" to how the
    caller spells them (e.g. "train.d_max", "--option d_max")."""
    name = {"d_max": "d_max", "batch_size": "batch_size", "clip_factor": "clip_factor",
            **(names or {})}
    if d_max is not None and (isinstance(d_max, bool) or not isinstance(d_max, int) or d_max < 1):
        raise ValueError(f"{name['d_max']} must be a positive integer, got {d_max!r}")
    if clip_factor is not None and (isinstance(clip_factor, bool)
                                    or not isinstance(clip_factor, (int, float))
                                    or not 0 < clip_factor < 1):
        raise ValueError(f"{name['clip_factor']} must lie in (0, 1), got {clip_factor!r}")
    terms = echo_terms(batch_size, d_max)
    if not replace and terms >= batch_size:
        raise ValueError(f"{name['d_max']}={terms} must be < {name['batch_size']}={batch_size} "
                         f"without replacement")
    r_max = _solve_clip_factor(terms)
    if clip_factor is not None and clip_factor > r_max:
        raise ValueError(f"{name['clip_factor']}={clip_factor} exceeds {r_max:.4f}, the largest "
                         f"clipping factor whose truncated Echo tail stays below float32 "
                         f"precision with d_max={terms}; allowed range (0, {r_max:.4f}]")
