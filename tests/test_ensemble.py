"""Vectorised ensembles: members independent, own noise, own Adam state, each trains like a
separate run."""
import copy
import json

import pytest
import torch
from scipy import stats

from echo import build_model
from echo.ensemble import Ensemble, fit_ensemble
from echo.train import (NonFiniteLossError, TrainConfig, compile_model, fit, load_checkpoint,
                        load_model)

SHAPE = (1, 8, 8)        # the digits images: a small MLP keeps these tests fast


def small_ensemble(method="echo", betas=(0.5, 1.0, 2.0), seeds=(0, 1, 2), strategy="vmap"):
    return Ensemble.build(method, list(betas), seeds=list(seeds), arch="mlp", latent_dim=6,
                          input_shape=SHAPE, strategy=strategy)


def member_grads(ensemble, x, seed):
    for p in ensemble.parameters():
        p.grad = None
    torch.manual_seed(seed)
    out = ensemble(x)
    out.loss.backward()
    return [p.grad.clone() for p in ensemble.parameters()], out.member_loss.detach()


@pytest.mark.parametrize("method,strategy", [("echo", "vmap"), ("vae", "vmap"), ("echo", "loop")])
def test_changing_one_member_leaves_the_others_bit_for_bit_unchanged(method, strategy):
    # Same random draws (same seed) twice; only member 2's weights differ in the second pass.
    # Any mixing across members (a shared batch for the Echo noise, summed statistics) would
    # move members 0 and 1.
    ensemble = small_ensemble(method, strategy=strategy)
    x = torch.rand(3, 20, *SHAPE).bernoulli()
    grads, losses = member_grads(ensemble, x, seed=5)
    with torch.no_grad():
        for p in ensemble.parameters():
            p[2].add_(0.1 * torch.randn_like(p[2]))
    grads2, losses2 = member_grads(ensemble, x, seed=5)
    assert torch.equal(losses[:2], losses2[:2]) and losses[2] != losses2[2]
    for g, g2 in zip(grads, grads2):
        assert torch.equal(g[:2], g2[:2])
    assert any(not torch.equal(g[2], g2[2]) for g, g2 in zip(grads, grads2))


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_member_gradient_equals_a_separate_models_gradient(strategy):
    # A batch of two makes the Echo noise deterministic (each example's only other is the
    # second one), so a separately built model with member k's weights sees the same noise.
    betas = [0.3, 1.0, 4.0]
    ensemble = small_ensemble(betas=betas, strategy=strategy)
    x = torch.rand(3, 2, *SHAPE).bernoulli()
    grads, losses = member_grads(ensemble, x, seed=0)
    for k, beta in enumerate(betas):
        model = ensemble.member(k)
        out = model(x[k], beta)
        out.loss.backward()
        assert out.loss.item() == pytest.approx(losses[k].item(), rel=1e-5)
        for g, p in zip(grads, model.parameters()):
            torch.testing.assert_close(g[k], p.grad, rtol=1e-4, atol=1e-6)


def test_each_member_has_its_own_adam_state():
    # Adam over the stacked weights must equal K Adams, each fed only its member's gradient.
    ensemble = small_ensemble()
    separate = [ensemble.member(k) for k in range(3)]
    optimizers = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in separate]
    stacked_opt = torch.optim.Adam(ensemble.parameters(), lr=1e-2)
    x = torch.rand(3, 20, *SHAPE).bernoulli()
    for step in range(3):
        grads, _ = member_grads(ensemble, x, seed=step)
        # Very different gradient scales per member: a shared statistic would show.
        with torch.no_grad():
            for p in ensemble.parameters():
                p.grad *= torch.tensor([1.0, 1e-3, 1e3]).view(3, *[1] * (p.dim() - 1))
        for k, (model, opt) in enumerate(zip(separate, optimizers)):
            for p, stacked in zip(model.parameters(), ensemble.parameters()):
                p.grad = stacked.grad[k].clone()
            opt.step()
        stacked_opt.step()
    for k, model in enumerate(separate):
        for p, stacked in zip(model.parameters(), ensemble.parameters()):
            torch.testing.assert_close(stacked.detach()[k], p.detach(), rtol=1e-5, atol=1e-7)
        # The member's slice of the optimiser state is the separate Adam's state.
        sliced = ensemble.member_optimizer_state(stacked_opt, k)["state"]
        own = optimizers[k].state_dict()["state"]
        for i in own:
            for name in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(sliced[i][name], own[i][name], rtol=1e-5, atol=1e-12)


def test_members_draw_their_own_echo_noise_distributed_like_a_single_model():
    # Four members with the same weights encode the same batch: each member's code follows the
    # law of a single model's code (Echo noise from the batch), yet the members' draws differ.
    torch.manual_seed(0)
    model = build_model("echo", arch="mlp", latent_dim=6, input_shape=SHAPE)
    ensemble = Ensemble([copy.deepcopy(model) for _ in range(4)], [1.0] * 4, strategy="vmap")
    x = torch.rand(20, *SHAPE).bernoulli()
    with torch.no_grad():
        single = torch.stack([model(x).z[0, 0] for _ in range(120)])
        members = torch.stack([ensemble(x, shared=True).z[:, 0, 0] for _ in range(120)])
        f, _ = model.channel.heads(model.encoder(x))
    assert members.shape == (120, 4)
    assert (members[:, 0] != members[:, 1]).float().mean() > 0.9
    for k in range(4):
        assert stats.ks_2samp(members[:, k].numpy(), single.numpy()).pvalue > 1e-3
    # The code is noisy (not the noiseless f), so the KS test compares two spreads.
    assert (single != f[0, 0]).all() and (members.std(0) > 0.5 * single.std()).all()


def test_fit_ensemble_trains_every_member_and_k1_matches_a_single_run(tmp_path):
    base = TrainConfig(method="echo", dataset="digits", arch="mlp", latent_dim=6, epochs=2,
                       progress=False, seed=0)
    results = fit_ensemble(TrainConfig(**{**base.__dict__, "out": str(tmp_path)}),
                           betas=[0.5, 2.0], strategy="vmap")
    for result, beta in zip(results, [0.5, 2.0]):
        first, last = result.history[0], result.history[-1]
        assert last["beta"] == beta
        assert last["train_neg_elbo"] < first["train_neg_elbo"]
        assert last["test_neg_elbo"] < first["test_neg_elbo"]
        assert last["test_neg_elbo"] == pytest.approx(last["test_rate"] + last["test_distortion"])
    # A higher beta buys a lower rate.
    assert results[1].metrics["test_rate"] < results[0].metrics["test_rate"]
    # Member checkpoints are ordinary fit checkpoints.
    model, config = load_model(tmp_path / "member_1" / "checkpoint.pt")
    assert config.beta == 2.0 and config.seed == 0
    assert torch.equal(model.decoder(torch.zeros(4, 6)), results[1].model.decoder(torch.zeros(4, 6)))
    state = load_checkpoint(tmp_path / "member_1" / "checkpoint.pt")
    assert state["optimizer"]["state"][0]["exp_avg"].shape == model.encoder[1].weight.shape

    # K = 1 stands for one separate run: same initial weights, own batch order and noise, so
    # the metrics agree to the run-to-run spread, not bit for bit.
    single = fit(base).history
    packed = fit_ensemble(base, seeds=[0], strategy="vmap")[0].history
    for a, b in zip(single, packed):
        assert b["test_neg_elbo"] == pytest.approx(a["test_neg_elbo"], rel=0.03)
        assert b["test_rate"] == pytest.approx(a["test_rate"], rel=0.1, abs=0.3)


def test_ensemble_rejects_mismatched_members():
    a = build_model("echo", arch="mlp", latent_dim=6, input_shape=SHAPE)
    b = build_model("echo", arch="mlp", latent_dim=7, input_shape=SHAPE)
    with pytest.raises(ValueError, match="architecture"):
        Ensemble([a, b], [1.0, 1.0])
    with pytest.raises(ValueError, match="one beta per model"):
        Ensemble([a], [1.0, 2.0])
    with pytest.raises(ValueError, match="one batch per member"):
        Ensemble([a, copy.deepcopy(a)], [1.0, 2.0])(torch.rand(3, 5, *SHAPE))


def test_compile_option_runs_eagerly_on_cpu_and_falls_back_when_compilation_fails():
    model = build_model("echo", arch="mlp", latent_dim=6, input_shape=SHAPE)
    x = torch.rand(10, *SHAPE).bernoulli()
    assert compile_model(model, "cpu") is model              # CPU: not worth compiling
    # A compiler that cannot run (here: an unknown backend) leaves the eager model.
    with pytest.warns(RuntimeWarning, match="unavailable"):
        assert compile_model(model, "cpu", force=True, backend="no-such-backend") is model

    def broken_backend(graph_module, example_inputs):
        raise RuntimeError("no C++ compiler")

    # Failing at the first call: warns, then runs eagerly with the same random draws.
    step = compile_model(model, "cpu", force=True, backend=broken_backend)
    torch.manual_seed(3)
    with pytest.warns(RuntimeWarning, match="failed"):
        loss = step(x, 1.0).loss
    torch.manual_seed(3)
    assert torch.equal(loss, model(x, 1.0).loss)
    # Dynamo traces the model: the compiled step equals the eager one, gradients included.
    traced = compile_model(model, "cpu", force=True, backend="eager")
    torch.manual_seed(4)
    traced(x, 2.0).loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch.manual_seed(4)
    model(x, 2.0).loss.backward()
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad)


def _tiny(**overrides) -> TrainConfig:
    return TrainConfig(**{**dict(method="echo", dataset="digits", arch="mlp", latent_dim=6,
                                 epochs=4, progress=False, seed=0, train_limit=600,
                                 test_limit=200), **overrides})


def _strip(history):
    return [{k: v for k, v in m.items() if k != "epoch_seconds"} for m in history]


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_fit_ensemble_resumes_exactly_from_its_member_checkpoints(tmp_path, strategy):
    config = _tiny()
    full = fit_ensemble(config, betas=[0.5, 2.0], strategy=strategy)
    states = {}
    fit_ensemble(config, betas=[0.5, 2.0], strategy=strategy,
                 on_epoch=lambda epoch, metrics, state: states.__setitem__(epoch, state()))
    # Through the files a run writes: each member's state is an ordinary checkpoint.
    for k, state in enumerate(states[2]):
        torch.save(state, tmp_path / f"member_{k}.pt")
    resume = [load_checkpoint(tmp_path / f"member_{k}.pt") for k in range(2)]
    resumed = fit_ensemble(config, betas=[0.5, 2.0], strategy=strategy, resume=resume)
    for a, b in zip(full, resumed):
        assert len(b.history) == 4
        assert _strip(b.history) == _strip(a.history)          # bit for bit, not approximately
    # A checkpoint of other members is refused by name.
    with pytest.raises(ValueError, match="beta"):
        fit_ensemble(config, betas=[0.5, 3.0], strategy=strategy, resume=resume)


def test_a_member_whose_loss_turns_nonfinite_stops_alone(tmp_path):
    # beta 1e39 is inf in float32: that member's loss is inf from the first step.
    config = _tiny(out=str(tmp_path))
    results = fit_ensemble(config, betas=[1.0, 1e39, 2.0], strategy="loop")
    stopped = results[1]
    assert stopped.stopped and "non-finite training loss at epoch 1" in stopped.stopped
    assert stopped.history == []
    metrics = json.loads((tmp_path / "member_1" / "metrics.json").read_text())
    assert "non-finite" in metrics["stopped"]
    assert load_checkpoint(tmp_path / "member_1" / "checkpoint.pt")["stopped"] == stopped.stopped
    # The others go on, and exactly as if the diverging member had been a healthy one: nothing
    # of it reaches them (same random streams, elementwise Adam, no shared tensors).
    healthy = fit_ensemble(_tiny(), betas=[1.0, 5.0, 2.0], strategy="loop")
    for k in (0, 2):
        assert results[k].stopped is None and len(results[k].history) == 4
        assert _strip(results[k].history) == _strip(healthy[k].history)
        assert results[k].history[-1]["test_neg_elbo"] < results[k].history[0]["test_neg_elbo"]


def test_an_ensemble_fails_only_when_every_member_has_stopped():
    with pytest.raises(NonFiniteLossError, match="every ensemble member"):
        fit_ensemble(_tiny(epochs=2), betas=[1e39, 2e39], strategy="loop")
