"""Autoregressive flows (MADE steps, MAF density, IAF channel) against autograd and integration."""
import math

import pytest
import torch
from torch import nn
from torch.autograd.functional import jacobian

from echo.channels import IAFChannel
from echo.flows import MADE, PAPER_HIDDEN, PAPER_STEPS, AutoregressiveFlow, AutoregressiveStep, \
    parse_hidden
from echo.marginals import MAFMarginal


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py



def randomise(module: nn.Module, std: float = 0.3, seed: int = 0) -> nn.Module:
    """Random weights everywhere (flows start at the identity, which would make tests vacuous).
    Masks are buffers, so autoregressive structure is kept."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * std)
    return module


def jacobian_of(fn, x):
    return jacobian(fn, x)          # [D, D] for one example


@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
def test_step_jacobian_is_triangular_and_log_det_is_exact(affine, reverse):
    torch.manual_seed(0)
    dim, context_dim = 5, 3
    order = torch.arange(1, dim + 1)
    order = order.flip(0) if reverse else order
    step = randomise(AutoregressiveStep(dim, (64, 64), context_dim=context_dim, affine=affine,
                                        order=order), std=0.2).double()
    context = torch.randn(1, context_dim, dtype=torch.float64)
    # Output i may depend only on inputs of lower degree (and on itself, diagonally).
    diagonal = torch.eye(dim, dtype=torch.bool)
    allowed = (order[None, :] < order[:, None]) | diagonal
    seen = torch.zeros(dim, dim, dtype=torch.bool)
    for _ in range(5):
        x = torch.randn(1, dim, dtype=torch.float64)
        jac = jacobian_of(lambda v: step(v[None], context)[0][0], x[0])
        log_det = step(x, context)[1][0]
        assert torch.all(jac[~allowed] == 0)
        seen |= jac != 0
        sign, logabs = torch.linalg.slogdet(jac)
        assert sign == 1
        assert log_det.item() == pytest.approx(logabs.item(), abs=1e-10)
        if not affine:                  # the paper's mean-only step preserves volume
            assert torch.allclose(jac.diagonal(), torch.ones(dim, dtype=torch.float64))
            assert log_det.item() == 0.0
        else:
            assert abs(log_det.item()) > 1e-3   # a test of something: the scale is not 1
    assert torch.equal(seen, allowed)   # every allowed dependence is actually used


@pytest.mark.parametrize("affine", [False, True])
def test_flow_log_det_matches_slogdet_of_the_composition(affine):
    torch.manual_seed(1)
    dim = 4
    flow = randomise(AutoregressiveFlow(dim, steps=3, hidden=(12, 12), context_dim=2,
                                        affine=affine), seed=1).double()
    context = torch.randn(1, 2, dtype=torch.float64)
    x = torch.randn(1, dim, dtype=torch.float64)
    jac = jacobian_of(lambda v: flow(v[None], context)[0][0], x[0])
    # After a reversed step the composition is no longer triangular: the flow mixes every pair.
    assert torch.all(jac != 0)
    _, logabs = torch.linalg.slogdet(jac)
    assert flow(x, context)[1][0].item() == pytest.approx(logabs.item(), abs=1e-10)


def test_made_context_reaches_every_output_including_the_first():
    made = randomise(MADE(3, (32,), context_dim=2, n_params=2))
    x = torch.randn(1, 3)
    c = torch.randn(1, 2, requires_grad=True)
    out = made(x, c)
    for p in range(2):
        for i in range(3):
            (grad,) = torch.autograd.grad(out[0, p, i], c, retain_graph=True)
            assert grad.abs().sum() > 0


def test_flows_start_at_the_identity():
    flow = AutoregressiveFlow(6, steps=2, hidden=(10,), affine=True)
    x = torch.randn(7, 6)
    y, log_det = flow(x)
    assert torch.equal(y, x) and torch.equal(log_det, torch.zeros(7))


def test_paper_sizes_and_option_validation():
    flow = AutoregressiveFlow(32)
    assert len(flow.steps) == PAPER_STEPS == 4
    widths = [layer.out_features for layer in flow.steps[0].made.hidden]
    assert tuple(widths) == PAPER_HIDDEN == (640, 640, 640)
    assert parse_hidden(128) == (128, 128, 128)
    assert parse_hidden([64, 32]) == (64, 32)
    with pytest.raises(ValueError, match="flow_hidden"):
        parse_hidden([64, 0])
    with pytest.raises(ValueError, match="flow_steps"):
        AutoregressiveFlow(3, steps=0)
    with pytest.raises(ValueError, match="permutation"):
        MADE(3, (4,), order=torch.tensor([1, 1, 2]))
    with pytest.raises(ValueError, match="context"):
        MADE(3, (4,), context_dim=2)(torch.randn(1, 3))


@pytest.mark.parametrize("affine", [False, True])
def test_maf_density_integrates_to_one_in_1d(affine):
    marginal = randomise(MAFMarginal(1, steps=3, hidden=(16, 16), affine=affine), std=0.5).double()
    grid = torch.linspace(-30, 30, 20001, dtype=torch.float64)[:, None]
    with torch.no_grad():
        density = marginal.log_prob(grid).exp()
    assert torch.trapezoid(density, grid[:, 0]).item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("affine", [False, True])
def test_maf_density_integrates_to_one_in_2d(affine):
    marginal = randomise(MAFMarginal(2, steps=4, hidden=(16, 16), affine=affine), std=0.2,
                         seed=2).double()
    axis = torch.linspace(-12, 12, 401, dtype=torch.float64)
    grid = torch.cartesian_prod(axis, axis)
    with torch.no_grad():
        density = marginal.log_prob(grid).exp().view(len(axis), len(axis))
        # Not a standard normal: the flow really moved the mass.
        standard = (-0.5 * grid.pow(2).sum(-1) - math.log(2 * math.pi)).exp().view_as(density)
    assert (density - standard).abs().max() > 0.02
    total = torch.trapezoid(torch.trapezoid(density, axis, dim=1), axis).item()
    assert total == pytest.approx(1.0, abs=1e-5)


def test_iaf_log_q_is_the_change_of_variables_density():
    """log q(z|x) returned by the IAF channel equals log N(eps) - log|det dz/deps| by autograd."""
    torch.manual_seed(3)
    features, dim = 4, 3
    channel = randomise(IAFChannel(features, dim, steps=2, hidden=(8, 8), affine=True),
                        std=0.4, seed=3).double()
    h = torch.randn(1, features, dtype=torch.float64)
    torch.manual_seed(5)
    enc = channel(h)
    torch.manual_seed(5)
    eps = torch.randn(1, dim, dtype=torch.float64)    # the same noise the channel drew

    def sample(e):
        mu, logvar = channel.params(h)
        z0 = mu + (0.5 * logvar).exp() * e[None]
        return channel.flow(z0, h)[0][0]

    assert torch.allclose(sample(eps[0]), enc.z[0])
    _, logabs = torch.linalg.slogdet(jacobian_of(sample, eps[0]))
    log_normal = -0.5 * (eps.pow(2) + math.log(2 * math.pi)).sum()
    assert enc.log_q[0].item() == pytest.approx((log_normal - logabs).item(), abs=1e-10)
    assert enc.gaussian is None       # not a plain Gaussian: no analytic KL may be used
