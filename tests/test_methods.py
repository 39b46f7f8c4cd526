"""The nine methods of the paper's Table 2: their marginals and penalties against known values,
real training on MNIST (MLP and conv), the IWAE bound, and the CLI."""
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import echo.marginals as marginals
from echo import METHODS, build_model
from echo.channels import Encoding, GaussianChannel
from echo.data import load_dataset
from echo.marginals import StandardNormal, VampPrior, gaussian_kl_standard_normal
from echo.regularizers import MMDPenalty, mmd
from echo.train import TrainConfig, fit, main

from echo.methods import method_options
from pipeline.results.paper import PAPER_TABLE_2
from support import REPO

# Every registered method: one registered in echo/methods/ is tested here without an edit.
ALL_METHODS = tuple(sorted(METHODS))


def _has_density(method: str) -> bool:
    """Whether the method's marginal is a density (what its model says, on a 2-latent model)."""
    return build_model(method, arch="mlp", latent_dim=2,
                       training=TrainConfig(method=method)).has_density


DENSITY_METHODS = tuple(m for m in ALL_METHODS if _has_density(m))


def small_options(method: str) -> dict:
    """Small flows and few pseudo-inputs keep the tests inside their time budget, for every
    method that has such options; the paper's sizes are checked by test_paper_defaults."""
    options = method_options(method)
    return ({"n_pseudo": 50} if "n_pseudo" in options else {}) | \
        ({"flow_hidden": 64} if "flow_hidden" in options else {})


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def test_all_nine_methods_of_table_2_are_registered():
    """The paper's nine (Table 2) are registered; the tests below take every registered one."""
    assert set(PAPER_TABLE_2["binary_mnist"]) <= set(METHODS)
    assert len(PAPER_TABLE_2["binary_mnist"]) == 9
    # Only Echo's marginal has no density (its rate is exact instead).
    assert set(ALL_METHODS) - set(DENSITY_METHODS) == {"echo"}


def test_paper_defaults():
    vamp = build_model("vae-vamp", arch="mlp")
    assert vamp.marginal.pseudo_logits.shape == (250, 1, 28, 28)
    assert build_model("iaf-vamp", arch="mlp", n_pseudo=500).marginal.pseudo_logits.shape[0] == 500
    iaf_maf = build_model("iaf-maf", arch="mlp")
    for flow in (iaf_maf.channel.flow, iaf_maf.marginal.flow):
        assert len(flow.steps) == 4
        assert [layer.out_features for layer in flow.steps[0].made.hidden] == [640, 640, 640]
        assert not flow.steps[0].affine                      # mean-only steps, as in App. B
    for name in ("infovae", "iaf-mmd"):
        penalty = build_model(name, arch="mlp").regularizer
        # 2 sigma^2 = D^2: the authors' InfoVAE config (Zhao et al.'s); docs/methods.md
        assert penalty.weight == 999.0 and penalty.bandwidth == pytest.approx(32 / math.sqrt(2))
    with pytest.raises(ValueError, match="n_pseudo"):
        build_model("vae-vamp", arch="mlp", n_pseudo=0)
    with pytest.raises(ValueError, match="mmd_bandwidth"):
        build_model("infovae", arch="mlp", mmd_bandwidth=-1.0)
    with pytest.raises(ValueError, match="does not take"):
        build_model("vae-maf", arch="mlp", n_pseudo=3)


def test_default_params_yaml_validates_with_its_methods():
    from pipeline.config import load_params
    params = load_params(REPO / "params.yaml")
    assert "infovae" in params.sweep.methods


def test_gaussian_kl_matches_monte_carlo():
    torch.manual_seed(0)
    mu, logvar = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    n = 200_000
    eps = torch.randn(n, 4, 5, dtype=torch.float64)
    z = mu + (0.5 * logvar).exp() * eps
    log_q = -0.5 * (eps.pow(2) + logvar + math.log(2 * math.pi)).sum(-1)
    samples = log_q - StandardNormal().log_prob(z)                       # [n, 4]
    exact = gaussian_kl_standard_normal(mu, logvar)
    stderr = samples.std(0) / math.sqrt(n)
    assert torch.all((samples.mean(0) - exact).abs() < 4 * stderr)
    # And the VAE's rate uses it for plain Gaussian encodings (no sampling noise).
    enc = Encoding(z=z[0], log_q=log_q[0], gaussian=(mu, logvar))
    assert torch.equal(StandardNormal().rate(enc), exact)


def test_mmd_is_zero_for_one_distribution_and_matches_the_gaussian_closed_form_when_shifted():
    torch.manual_seed(0)
    n, dim, sigma = 400, 32, math.sqrt(32)
    shift = 0.5
    same = [mmd(torch.randn(n, dim), torch.randn(n, dim), sigma).item() for _ in range(5)]
    shifted = mmd(torch.randn(n, dim) + shift, torch.randn(n, dim), sigma).item()
    # Population MMD^2 of N(delta, I) vs N(0, I) under exp(-|a-b|^2 / (2 s^2)):
    # 2 (s^2 / (s^2 + 2))^(D/2) (1 - exp(-|delta|^2 / (2 (s^2 + 2)))).
    base = (sigma ** 2 / (sigma ** 2 + 2)) ** (dim / 2)
    expected = 2 * base * (1 - math.exp(-dim * shift ** 2 / (2 * (sigma ** 2 + 2))))
    assert abs(np.mean(same)) < 0.005 and max(abs(v) for v in same) < 0.01
    assert shifted == pytest.approx(expected, rel=0.15)
    assert expected > 0.05
    penalty = MMDPenalty(dim, bandwidth=sigma)
    assert penalty(torch.randn(n, dim) + shift).item() > 999 * 0.05 * 0.8
    # The default bandwidth (2 sigma^2 = D^2) is wider: the same shift costs ~15 nats, not ~50.
    wide = dim / math.sqrt(2)
    expected_wide = 2 * (wide ** 2 / (wide ** 2 + 2)) ** (dim / 2) * (
        1 - math.exp(-dim * shift ** 2 / (2 * (wide ** 2 + 2))))
    assert MMDPenalty(dim)(torch.randn(n, dim) + shift).item() == pytest.approx(
        999 * expected_wide, rel=0.2)


def test_vamp_prior_log_density_is_the_mixture_by_hand(monkeypatch):
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.Tanh())
    channel = GaussianChannel(5, 3)
    prior = VampPrior(encoder, channel, (1, 2, 3), n_pseudo=4)
    z = torch.randn(7, 3)
    with torch.no_grad():
        got = prior.log_prob(z).double().numpy()
        u = torch.sigmoid(prior.pseudo_logits)
        h = encoder(u)
        mu, logvar = channel.mu_head(h).double().numpy(), channel.logvar_head(h).double().numpy()
    zz = z.double().numpy()
    expected = []
    for zi in zz:
        densities = [np.prod(np.exp(-0.5 * (zi - mu[k]) ** 2 / np.exp(logvar[k]))
                             / np.sqrt(2 * np.pi * np.exp(logvar[k]))) for k in range(4)]
        expected.append(np.log(np.mean(densities)))
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # Chunked evaluation (used for large IWAE batches) gives the same numbers.
    monkeypatch.setattr(marginals, "_VAMP_CHUNK_ELEMENTS", 4 * 3 * 2)
    with torch.no_grad():
        np.testing.assert_allclose(prior.log_prob(z).numpy(), got, rtol=1e-6)


# ---------------------------------------------------------------- real training on MNIST

@pytest.fixture(scope="session")      # session: a worker running these tests apart builds it once
def mnist_small(mnist_dir, tmp_path_factory):
    """1000 training and 200 test images of statically binarized MNIST, as a prepared .npz."""
    x_train, y_train = load_dataset("binary_mnist", "train", mnist_dir)
    x_test, y_test = load_dataset("binary_mnist", "test", mnist_dir)
    path = tmp_path_factory.mktemp("data") / "binary_mnist_small.npz"
    np.savez(path, train_x=x_train[:1000].numpy(), train_y=y_train[:1000].numpy(),
             test_x=x_test[:200].numpy(), test_y=y_test[:200].numpy())
    return path


_TRAINED: dict[str, object] = {}


def train_mlp(method: str, prepared) -> object:
    """100 steps (10 epochs of 10 batches of 50) of the MLP model; cached per method."""
    if method not in _TRAINED:
        config = TrainConfig(method=method, dataset="binary_mnist", prepared=str(prepared),
                             arch="mlp", epochs=10, batch_size=50, lr=1e-3, train_limit=500,
                             test_limit=200, seed=0, device="cpu", progress=False,
                             method_options=small_options(method))
        _TRAINED[method] = fit(config)
    return _TRAINED[method]


@pytest.mark.xdist_group("methods_mnist")       # the models train_mlp trains, once
@pytest.mark.parametrize("method", ALL_METHODS)
def test_every_method_trains_on_mnist_mlp(method, mnist_small):
    history = train_mlp(method, mnist_small).history
    assert len(history) == 10
    for h in history:
        assert all(math.isfinite(h[k]) for k in ("train_rate", "train_distortion",
                                                    "test_rate", "test_distortion"))
    first, last = history[0], history[-1]
    assert last["train_neg_elbo"] < first["train_neg_elbo"] - 30
    assert last["test_neg_elbo"] < first["test_neg_elbo"] - 30
    assert last["test_neg_elbo"] == pytest.approx(last["test_rate"] + last["test_distortion"])


@pytest.mark.parametrize("method", ALL_METHODS)
def test_every_method_trains_with_the_paper_conv_network(method, mnist_small):
    """The paper's conv network with the paper's flow sizes: a few steps on one small batch."""
    torch.manual_seed(0)
    x = torch.from_numpy(np.load(mnist_small)["train_x"][:10])
    options = {"n_pseudo": 5} if "n_pseudo" in method_options(method) else {}
    model = build_model(method, arch="conv", training=TrainConfig(method=method,
                                                                  batch_size=len(x)), **options)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        out = model(x, 1.0)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
        assert out.rate.shape == out.distortion.shape == (len(x),)
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-3:]) < losses[0] - 20


@pytest.mark.xdist_group("methods_mnist")
@pytest.mark.parametrize("method", DENSITY_METHODS)
def test_iwae_bound_is_above_the_elbo_and_tightens_with_k(method, mnist_small):
    model = train_mlp(method, mnist_small).model.eval()
    x = torch.from_numpy(np.load(mnist_small)["test_x"][:100])
    torch.manual_seed(0)
    with torch.no_grad():
        elbos = torch.stack([-(o.rate + o.distortion) for o in (model(x) for _ in range(10))])
    elbo = elbos.mean(0)                                    # per example, [100]
    iwae = {k: model.iwae_bound(x, k=k, chunk=50) for k in (1, 10, 100)}
    # k = 1 is the single-sample ELBO: the same estimator, so the same mean within its noise.
    stderr = (iwae[1] - elbo).std() / math.sqrt(len(x))
    assert abs((iwae[1] - elbo).mean()) < 4 * stderr
    assert iwae[100].mean() > iwae[10].mean() > iwae[1].mean()
    assert iwae[100].mean() >= elbo.mean()
    assert (iwae[100] >= elbo).float().mean() > 0.9           # per example, almost always


def test_echo_has_no_iwae_bound(mnist_small):
    model = build_model("echo", arch="mlp", batch_size=20)
    with pytest.raises(ValueError, match="no density"):
        model.iwae_bound(torch.from_numpy(np.load(mnist_small)["test_x"][:20]), k=2)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_cli_trains_every_method(method, capsys):
    argv = ["--method", method, "--dataset", "digits", "--arch", "mlp", "--epochs", "1",
            "--batch-size", "50", "--train-limit", "100", "--test-limit", "50", "--device", "cpu",
            "--no-progress"]
    for key, value in small_options(method).items():
        argv += ["--option", f"{key}={json.dumps(value)}"]
    assert main(argv) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert math.isfinite(metrics["test_neg_elbo"]) and metrics["epoch"] == 1


def test_vamp_prior_shares_the_encoder_and_survives_a_checkpoint(tmp_path):
    """The VampPrior holds the model's own encoder (not a copy): a checkpoint written by `fit`
    reloads to the same model, with the prior still tied to the encoder."""
    from echo.train import load_model
    config = TrainConfig(method="iaf-vamp", dataset="digits", arch="mlp", epochs=1, batch_size=50,
                         train_limit=100, test_limit=50, device="cpu", progress=False,
                         out=str(tmp_path), method_options={"n_pseudo": 5, "flow_hidden": 16})
    trained = fit(config).model.eval()
    assert trained.marginal.encoder is trained.encoder
    model, _ = load_model(tmp_path / "checkpoint.pt")
    model.eval()
    assert model.marginal.encoder is model.encoder and model.marginal.posterior is model.channel
    x = torch.rand(6, 1, 8, 8)
    torch.manual_seed(0)
    expected = trained.iwae_bound(x, k=5)
    torch.manual_seed(0)
    assert torch.allclose(model.iwae_bound(x, k=5), expected)
