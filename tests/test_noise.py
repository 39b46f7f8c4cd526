"""The Echo channel's math: exact rate, Lemma 2.2, sampling structure, gradients, validation."""
import math

import pytest
import torch
from scipy import stats

from echo import clip_factor, echo_low_rate_limit, echo_noise, echo_rate, echo_sample
from echo.noise import truncation_error_bound


def test_gaussian_channel_has_the_known_variance_and_mutual_information():
    # f(x) = x, x ~ N(0, 1), constant S = s: z ~ N(0, 1/(1 - s^2)) and, the noise being built
    # from the other examples (independent of x_i), I(X;Z) = 1/2 log(Var z / Var(s eps)) = -log s.
    torch.manual_seed(0)
    s = torch.tensor([0.3, 0.5, 0.7, 0.8])
    x = torch.randn(4000, 4)
    log_s = s.log().expand_as(x)
    z = echo_sample(x, log_s)
    var_z = z.var(0)
    expected_var = 1 / (1 - s**2)
    assert torch.allclose(var_z, expected_var, rtol=0.08), (var_z, expected_var)
    # Gaussian mutual information measured on the samples vs the exact rate of Eq. 4.
    mi_measured = 0.5 * (var_z / (z - x).var(0)).log()
    assert torch.allclose(mi_measured, -s.log(), atol=0.05), (mi_measured, -s.log())
    rate = echo_rate(log_s)
    assert rate.shape == (4000,)
    assert torch.allclose(rate, -s.log().sum().expand(4000))
    assert abs(float(mi_measured.sum()) - float(rate[0])) < 0.15


def test_noise_has_the_distribution_of_the_code_for_a_bimodal_encoder():
    # Lemma 2.2: eps = (z - f)/S has the law of z, also when f(x) is far from Gaussian.
    torch.manual_seed(1)
    n = 4000
    modes = torch.where(torch.rand(n, 1) < 0.3, -0.8, 0.8)
    f = torch.tanh(2 * (modes + 0.05 * torch.randn(n, 1)))
    log_s = torch.full_like(f, math.log(0.6))
    z = echo_sample(f, log_s)
    eps = (z - f) / log_s.exp()
    same = stats.ks_2samp(eps[:, 0].numpy(), z[:, 0].numpy())
    assert same.pvalue > 0.01, same
    # The test has power: the code is not distributed like f itself.
    different = stats.ks_2samp(f[:, 0].numpy(), z[:, 0].numpy())
    assert different.pvalue < 1e-6, different


@pytest.mark.parametrize("d_max", [None, 3, 7])
def test_without_replacement_uses_distinct_others_never_itself(d_max):
    # f_j = e_j makes eps_i[j] the weight of example j in example i's noise.
    batch = 8
    f = torch.eye(batch)
    log_s = torch.full((batch, batch), math.log(0.5))
    for seed in range(20):
        eps = echo_noise(f, log_s, d_max=d_max, generator=torch.Generator().manual_seed(seed))
        used = eps > 0
        assert not used.diagonal().any(), "an example appeared in its own noise"
        expected = batch - 1 if d_max is None else d_max
        assert (used.sum(1) == expected).all()
        # Each weight is a distinct power 0.5^k, k = 0..d_max-1: every other used once.
        for row in eps:
            powers = sorted(torch.log2(row[row > 0]).round().neg().long().tolist())
            assert powers == list(range(expected))


def test_with_replacement_draws_others_uniformly():
    batch, d_max = 5, 40
    f = torch.eye(batch)
    log_s = torch.full((batch, batch), math.log(0.999))  # weights ~1: eps counts the draws
    eps = echo_noise(f, log_s, d_max=d_max, replace=True, generator=torch.Generator().manual_seed(0))
    assert (eps.diagonal() == 0).all()
    assert torch.allclose(eps.sum(1), torch.full((batch,), float(d_max)), rtol=0.05)
    counts = torch.zeros(batch)
    for seed in range(200):
        e = echo_noise(f, log_s, d_max=d_max, replace=True, generator=torch.Generator().manual_seed(seed))
        counts += e[0]
    share = counts[1:] / counts[1:].sum()
    assert torch.allclose(share, torch.full((batch - 1,), 0.25), atol=0.02)


def test_gradients_reach_f_and_s_of_the_noise_examples():
    torch.manual_seed(0)
    f = (torch.rand(6, 3) - 0.5).requires_grad_()
    log_s = (torch.rand(6, 3).log() - 0.2).requires_grad_()
    z = echo_sample(f, log_s)
    z[0].sum().backward()
    assert f.grad[1:].abs().sum() > 0 and log_s.grad[1:].abs().sum() > 0
    assert (f.grad[1:].abs().sum(1) > 0).all(), "every other example feeds example 0's noise"


def test_clip_factor_matches_the_paper_and_bounds_the_tail():
    r = clip_factor(99)
    assert abs(r - 0.8359) < 1e-4                      # the authors' value for batch 100
    assert truncation_error_bound(r, 99) == pytest.approx(2.0**-23, rel=1e-6)
    assert clip_factor(199) > r > clip_factor(49)      # more terms allow a larger factor
    assert clip_factor(99, max_abs_f=2.0) < r
    assert echo_low_rate_limit(r, 32) == pytest.approx(-32 * math.log(r))
    with pytest.raises(ValueError, match="d_max"):
        clip_factor(0)


@pytest.mark.parametrize("f_shape, s_shape, kwargs, match", [
    ((4, 3), (4, 2), {}, "same shape"),
    ((4,), (4,), {}, "matrices"),
    ((1, 3), (1, 3), {}, "batch size must be >= 2"),
    ((4, 3), (4, 3), {"d_max": 4}, "d_max=4"),
    ((4, 3), (4, 3), {"d_max": 0}, "positive integer"),
])
def test_bad_shapes_and_d_max_raise(f_shape, s_shape, kwargs, match):
    with pytest.raises(ValueError, match=match):
        echo_sample(torch.zeros(f_shape), torch.full(s_shape, -1.0), **kwargs)


def test_d_max_beyond_batch_is_fine_with_replacement():
    z = echo_sample(torch.zeros(4, 3), torch.full((4, 3), -1.0), d_max=50, replace=True)
    assert z.shape == (4, 3)


@pytest.mark.parametrize("which", ["f", "log_s"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_raises(which, bad):
    f, log_s = torch.zeros(4, 3), torch.full((4, 3), -1.0)
    (f if which == "f" else log_s)[2, 1] = bad
    with pytest.raises(ValueError, match=f"{which} contains NaN or infinite"):
        echo_sample(f, log_s)


def test_s_of_one_or_more_raises():
    with pytest.raises(ValueError, match="log_s must be < 0"):
        echo_sample(torch.zeros(4, 3), torch.zeros(4, 3))
