"""The chunked, recomputing Echo noise (`echo.noise._EchoNoise`, issue 7) against the plain
vectorised reference: same values and gradients, also under vmap and torch.compile, and a peak
memory over forward + backward of at most B x d_max x D floats."""

import pytest
import torch
from torch.func import vmap

from benchmarks.run import AllocationTracker
from echo import echo_noise, echo_sample
from echo.noise import (ECHO_CHUNKS, _EchoNoise, _other_indices, _pieces, _reference_noise,
                        _shifted_order, echo_noise_reference)


def encoder_outputs(batch, dim, *, dtype=torch.float32, seed=0, deep=False, k=None):
    """f in (-1, 1) (tanh) and log S < 0; deep=True makes prod S underflow float32 within the
    echo sum (log S down to -4), as an encoder near its low-rate limit never does but tests the
    tail; k stacks k members."""
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, dim) if k is None else (k, batch, dim)
    f = torch.randn(shape, generator=gen, dtype=dtype).tanh()
    low = 4.0 if deep else 1.3
    log_s = -0.18 - (low - 0.18) * torch.rand(shape, generator=gen, dtype=dtype)
    return f.requires_grad_(), log_s.requires_grad_()


def noise_and_grads(fn, f, log_s, grad, **kwargs):
    eps = fn(f, log_s, **kwargs)
    return (eps, *torch.autograd.grad(eps, (f, log_s), grad))


CASES = [  # batch, dim, d_max, replace
    (100, 32, None, False), (100, 32, 40, True), (5, 3, 1, False), (5, 3, 4, False),
    (5, 3, 1, True), (5, 3, 2, True), (5, 3, 11, True), (9, 4, 5, False), (9, 4, 8, False),
]


@pytest.mark.parametrize("deep", [False, True])
@pytest.mark.parametrize("batch, dim, d_max, replace", CASES)
def test_values_and_gradients_equal_the_reference_in_float32(batch, dim, d_max, replace, deep):
    f, log_s = encoder_outputs(batch, dim, deep=deep)
    grad = torch.randn(batch, dim, generator=torch.Generator().manual_seed(1))
    got, want = (noise_and_grads(fn, f, log_s, grad, d_max=d_max, replace=replace,
                                 generator=torch.Generator().manual_seed(7))
                 for fn in (echo_noise, echo_noise_reference))
    for name, a, b in zip(("eps", "d/df", "d/dlog_s"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)
    if d_max != 1:   # with one echo term, eps = f(x^(1)) does not depend on S
        assert got[2].abs().max() > 0.1   # the log_s gradient is not trivially zero


@pytest.mark.parametrize("batch, dim, d_max, replace", [
    (5, 3, 1, False), (5, 3, 2, False), (5, 3, 4, False),
    (5, 3, 1, True), (5, 3, 3, True), (5, 3, 9, True),
])
def test_gradcheck_in_float64(batch, dim, d_max, replace):
    f, log_s = encoder_outputs(batch, dim, dtype=torch.float64, seed=d_max)

    def noise(f, log_s):   # a fresh generator each call: the same echo indices every time
        return echo_noise(f, log_s, d_max=d_max, replace=replace, check=False,
                          generator=torch.Generator().manual_seed(3))

    assert torch.autograd.gradcheck(noise, (f, log_s))
    # And equal to the reference to float64 rounding.
    grad = torch.randn(batch, dim, dtype=torch.float64)
    got = noise_and_grads(noise, f, log_s, grad)
    want = noise_and_grads(echo_noise_reference, f, log_s, grad, d_max=d_max, replace=replace,
                           generator=torch.Generator().manual_seed(3))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_only_the_needed_gradient_is_computed():
    f, log_s = encoder_outputs(7, 3)
    gen = lambda: torch.Generator().manual_seed(0)   # noqa: E731
    g_f, = torch.autograd.grad(echo_noise(f, log_s.detach(), generator=gen()).sum(), f)
    g_s, = torch.autograd.grad(echo_noise(f.detach(), log_s, generator=gen()).sum(), log_s)
    want = torch.autograd.grad(echo_noise_reference(f, log_s, generator=gen()).sum(), (f, log_s))
    torch.testing.assert_close(g_f, want[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_s, want[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("d_max", list(range(1, 40)) + [99, 199])
def test_pieces_cover_the_echo_order_once_in_at_most_four(d_max):
    pieces = _pieces(d_max)
    assert len(pieces) <= ECHO_CHUNKS == 4
    assert [p for a, b in pieces for p in range(a, b)] == list(range(d_max))
    # Two pieces' worth of [c, B, D] temporaries fit in one B x d_max x D array (d_max >= 2).
    assert d_max == 1 or 2 * max(b - a for a, b in pieces) <= d_max


def test_under_vmap_each_member_matches_its_own_run_for_the_same_indices():
    k, batch, dim = 3, 8, 5
    f, log_s = encoder_outputs(batch, dim, k=k)
    grad = torch.randn(k, batch, dim)
    idx = torch.stack([_other_indices(batch, batch - 1, False, "cpu",
                                      torch.Generator().manual_seed(m)) for m in range(k)])
    order = torch.stack([_shifted_order(i) for i in idx])
    eps = vmap(lambda f, s, o: _EchoNoise.apply(f, s, o)[0])(f, log_s, order)
    g_f, g_s = torch.autograd.grad(eps, (f, log_s), grad)
    for m in range(k):
        fm, sm = f[m].detach().requires_grad_(), log_s[m].detach().requires_grad_()
        want = noise_and_grads(lambda a, b: _reference_noise(a, b, idx[m]), fm, sm, grad[m])
        for a, b in zip((eps[m], g_f[m], g_s[m]), want):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # torch.func.grad inside vmap (per-member gradients without .backward) agrees too.
    member_grad = torch.func.grad(lambda f, s, o, g: (_EchoNoise.apply(f, s, o)[0] * g).sum(),
                                  argnums=(0, 1))
    g_f2, g_s2 = vmap(member_grad)(f.detach(), log_s.detach(), order, grad)
    torch.testing.assert_close(g_f2, g_f, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_s2, g_s, rtol=1e-6, atol=1e-6)


def test_public_noise_under_vmap_draws_per_member_and_matches_same_randomness():
    k, batch, dim = 3, 10, 4
    f, log_s = encoder_outputs(batch, dim, k=k)
    grad = torch.randn(k, batch, dim)
    # randomness="same": every member draws the indices of one unbatched draw of the same seed.
    torch.manual_seed(11)
    eps = vmap(lambda a, b: echo_noise(a, b, check=False), randomness="same")(f, log_s)
    g_f, g_s = torch.autograd.grad(eps, (f, log_s), grad)
    for m in range(k):
        fm, sm = f[m].detach().requires_grad_(), log_s[m].detach().requires_grad_()
        torch.manual_seed(11)
        want = noise_and_grads(echo_noise_reference, fm, sm, grad[m], check=False)
        for a, b in zip((eps[m], g_f[m], g_s[m]), want):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # randomness="different" (echo/ensemble.py): identical members get different noise.
    same_f, same_s = (t[:1].detach().expand(k, -1, -1).clone().requires_grad_() for t in (f, log_s))
    eps = vmap(lambda a, b: echo_noise(a, b, check=False), randomness="different")(same_f, same_s)
    assert not torch.equal(eps[0], eps[1]) and not torch.equal(eps[1], eps[2])
    eps.sum().backward()
    assert same_f.grad.abs().sum() > 0 and same_s.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile_gives_the_eager_values_and_gradients(backend):
    f, log_s = encoder_outputs(12, 4)
    order = _shifted_order(_other_indices(12, 11, False, "cpu", torch.Generator().manual_seed(0)))

    def noise(f, log_s, order):
        return _EchoNoise.apply(f, log_s, order)[0]

    compiled = torch.compile(noise, backend=backend, fullgraph=True)
    grad = torch.randn(12, 4)
    got = noise_and_grads(compiled, f, log_s, grad, order=order)
    want = noise_and_grads(noise, f, log_s, grad, order=order)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile_of_vmap_gives_the_eager_values_and_gradients(backend):
    # echo/ensemble.py compiles a vmapped step. There dynamo does not use the Function's
    # backward: it inlines the forward and differentiates its ops, so the forward must be
    # autograd-safe (no in-place change of a tensor autograd keeps).
    k, batch, dim = 3, 12, 4
    f, log_s = encoder_outputs(batch, dim, k=k)
    order = torch.stack([_shifted_order(_other_indices(batch, batch - 1, False, "cpu",
                                                       torch.Generator().manual_seed(m)))
                         for m in range(k)])
    noise = vmap(lambda f, s, o: _EchoNoise.apply(f, s, o)[0])
    grad = torch.randn(k, batch, dim)
    compiled = torch.compile(noise, backend=backend)
    got = noise_and_grads(lambda a, b: compiled(a, b, order), f, log_s, grad)
    want = noise_and_grads(lambda a, b: noise(a, b, order), f, log_s, grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_forward_alone_differentiates_to_the_same_gradients():
    # What dynamo does under vmap (above), checked without a compiler: autograd through
    # _EchoNoise.forward's own ops equals the Function's backward.
    f, log_s = encoder_outputs(20, 5)
    order = _shifted_order(_other_indices(20, 19, False, "cpu", torch.Generator().manual_seed(0)))
    grad = torch.randn(20, 5)
    got = noise_and_grads(lambda a, b: _EchoNoise.forward(a, b, order)[0], f, log_s, grad)
    want = noise_and_grads(lambda a, b: _EchoNoise.apply(a, b, order)[0], f, log_s, grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_double_backward_raises():
    f, log_s = encoder_outputs(6, 2)
    g_f, = torch.autograd.grad(echo_noise(f, log_s).pow(2).sum(), f, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        g_f.sum().backward()


def test_seeded_runs_repeat_bit_for_bit():
    f, log_s = encoder_outputs(100, 32)
    runs = []
    for _ in range(2):
        torch.manual_seed(5)
        z = echo_sample(f, log_s)
        runs.append((z, *torch.autograd.grad(z.square().sum(), (f, log_s))))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def peak_bytes(fn, f, log_s, **kwargs):
    """Peak bytes of the tensors alive during one forward + backward of fn (every tensor the
    ops allocate: temporaries, autograd's saved tensors, the indices, the gradients)."""
    tracker = AllocationTracker()
    with tracker:
        z = fn(f, log_s, check=False, **kwargs)
        z.sum().backward()
        del z
    return tracker.peak


def test_peak_memory_at_the_paper_settings_is_within_one_b_dmax_d_array():
    # Issue 7's target at batch 100, d_max = 99, D = 32 (the paper's; benchmarks/run.py's
    # echo_noise_memory): the peak over forward + backward of the Echo sample, everything
    # counted (int64 indices, saved tensors, [B, D] gradients, f + S eps), is at most
    # 1.0 x B*d_max*D float32s. Measured: 0.68 x (two [25, 100, 32] pieces 0.51 x, the
    # shifted int64 order 0.06 x, eleven [B, D] tensors 0.11 x).
    batch, d_max, dim = 100, 99, 32
    f, log_s = encoder_outputs(batch, dim, deep=True)
    unit = batch * d_max * dim * 4
    assert peak_bytes(echo_sample, f, log_s) <= 1.0 * unit
    # The tracker sees what the plain vectorised version holds (so the bound has teeth):
    # ~5 x (cumsum's backward holds three [B, d_max, D] arrays at once).
    def reference_sample(f, log_s, **kwargs):
        return f + log_s.exp() * echo_noise_reference(f, log_s, **kwargs)

    assert peak_bytes(reference_sample, f, log_s) > 4.0 * unit


@pytest.mark.parametrize("batch, dim, d_max, replace, dtype", [
    (100, 32, 40, False, torch.float32), (64, 8, 200, True, torch.float32),
    (50, 16, 49, False, torch.float64), (40, 8, 39, False, torch.float32),
    (10, 1, 9, False, torch.float32), (10, 4, 1, False, torch.float32),
    (10, 4, 2, True, torch.float32), (10, 4, 5, False, torch.float32),
])
def test_peak_memory_is_two_pieces_plus_indices_and_small_tensors(batch, dim, d_max, replace,
                                                                  dtype):
    # The bound asserted, for any shape: 2 pieces of [c, B, D] floats (c = ceil(d_max / 4),
    # 2c <= d_max for d_max >= 2, so within one B x d_max x D array) + the integer tensors of the
    # index draw (argsort keys and the [B, d_max] indices; counted at 3 x B*max(B, d_max)
    # int64s, measured below that) + 12 tensors of [B, D] (eps, grads, the log-prefixes of the
    # <= 4 pieces, f + S eps; 11 measured). The [B, D] and index terms do not grow with D x d_max.
    f, log_s = encoder_outputs(batch, dim, dtype=dtype)
    size = f.element_size()
    piece = max(b - a for a, b in _pieces(d_max))
    bound = (2 * piece * batch * dim * size + 3 * batch * max(batch, d_max) * 8
             + 12 * batch * dim * size)
    assert peak_bytes(echo_sample, f, log_s, d_max=d_max, replace=replace) <= bound
    if dim >= 16 and d_max >= 8:   # there the whole peak is within one B x d_max x D array
        assert peak_bytes(echo_sample, f, log_s, d_max=d_max, replace=replace) <= (
            batch * d_max * dim * size)
