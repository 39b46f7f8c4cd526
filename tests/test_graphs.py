"""Whole-step CUDA graphs (echo/graphs.py, TrainConfig.cuda_graph).

The CPU tests run everywhere (a graphed step is the eager step there); the CUDA tests run on a
GPU machine (`python -m pytest tests/test_graphs.py` there; benchmarks/gpu.sh does).
"""
import dataclasses
import subprocess
import sys
import textwrap

import pytest
import torch

from echo.ensemble import fit_ensemble
from echo.graphs import GraphedStep, graph_ready_adam, portable_optimizer_state
from echo.train import TrainConfig, fit
from support import REPO

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DIGITS = TrainConfig(method="echo", dataset="digits", arch="mlp", latent_dim=8, epochs=6,
                     batch_size=100, lr=1e-3, progress=False, device="cpu")


def test_graphed_step_is_the_eager_step_on_cpu():
    calls = []

    def fn(x):
        calls.append(1)
        return x * 2

    step = GraphedStep(fn, enabled=True, warmup=1)
    for i in range(5):
        x = torch.full((3,), float(i))
        assert torch.equal(step(x), x * 2)
    assert len(calls) == 5 and not step.replaying


def test_portable_optimizer_state_turns_device_learning_rates_into_floats():
    p = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.Adam([p], lr=torch.tensor(0.01))
    state = portable_optimizer_state(optimizer.state_dict())
    assert state["param_groups"][0]["lr"] == pytest.approx(0.01)
    assert isinstance(state["param_groups"][0]["lr"], float)
    assert state["param_groups"][0]["capturable"] is False


def test_cuda_graph_option_trains_like_eager_on_cpu():
    """On the CPU the option is accepted and changes nothing: the same seeded run."""
    eager = fit(dataclasses.replace(DIGITS, cuda_graph=False))
    graphed = fit(dataclasses.replace(DIGITS, cuda_graph=True))
    for key in ("train_neg_elbo", "test_neg_elbo", "test_rate", "epoch_lr"):
        assert [h[key] for h in graphed.history] == [h[key] for h in eager.history], key


@cuda
def test_replays_use_new_inputs_and_fresh_random_numbers():
    calls = []

    def fn(x):
        calls.append(1)
        return x * 2 + torch.rand_like(x)

    step = GraphedStep(fn, warmup=2)
    outs = []
    for i in range(8):
        x = torch.full((1000,), float(i), device="cuda")
        out = step(x).clone()
        noise = out - 2 * x
        assert bool(((noise >= 0) & (noise < 1)).all()), i
        outs.append(noise)
    assert step.replaying
    assert len(calls) == 3          # 2 warm-up calls and the capture; the rest are replays
    assert not torch.equal(outs[-1], outs[-2])      # the generator advanced between replays
    # another shape runs eagerly
    assert step(torch.zeros(7, device="cuda")).shape == (7,)


@cuda
def test_an_uncapturable_step_fails_with_the_fix_named():
    # In a subprocess: a failed capture leaves PyTorch's CUDA generator unusable in its process.
    script = textwrap.dedent("""
        import torch
        from echo.graphs import GraphCaptureError, GraphedStep

        def fn(x):
            if x.sum().item() > -1:      # a host synchronisation: not capturable
                return x + 1
            return x

        step = GraphedStep(fn, warmup=1)
        assert torch.equal(step(torch.zeros(4, device="cuda")).cpu(), torch.ones(4))
        try:
            step(torch.zeros(4, device="cuda"))
        except GraphCaptureError as err:
            assert "without cuda_graph" in str(err), err
            print("raised")
        """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "raised", done.stderr[-2000:]


@cuda
def test_graphed_adam_follows_the_schedule_and_matches_eager_adam():
    torch.manual_seed(0)
    w0 = torch.randn(50, device="cuda")
    target = torch.randn(50, device="cuda")
    results = {}
    for graphs in (False, True):
        w = torch.nn.Parameter(w0.clone())
        optimizer = torch.optim.Adam([w], lr=0.05)
        if graphs:
            graph_ready_adam(optimizer, torch.device("cuda"))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))

        def train_step(x, w=w, optimizer=optimizer):
            loss = ((w - x) ** 2).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return loss.detach()

        step = GraphedStep(train_step, enabled=graphs)
        losses = []
        for _ in range(20):
            losses.append(float(step(target)))
            scheduler.step()
        results[graphs] = (w.detach().clone(), losses)
        if graphs:
            assert step.replaying
    # capturable Adam orders its arithmetic differently: equal to float32 rounding
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-5, atol=1e-5)
    assert results[True][1] == pytest.approx(results[False][1], rel=1e-5)


@cuda
def test_graphed_fit_trains_like_eager_fit_and_resumes_anywhere():
    config = dataclasses.replace(DIGITS, device="cuda", epochs=8, cuda_graph=False)
    eager = fit(config)
    kept = {}

    def on_epoch(epoch, metrics, state):
        if epoch == 4:
            kept["state"] = state()

    graphed = fit(dataclasses.replace(config, cuda_graph=True), on_epoch=on_epoch)
    # Trains: the loss falls, and ends where the eager run ends (other noise draws, so within
    # the seed-to-seed spread, not bit for bit), with the same learning-rate schedule.
    first, last = graphed.history[0], graphed.history[-1]
    assert last["train_neg_elbo"] < first["train_neg_elbo"] - 2
    assert last["test_neg_elbo"] == pytest.approx(eager.metrics["test_neg_elbo"], rel=0.05)
    assert [h["epoch_lr"] for h in graphed.history] == pytest.approx([h["epoch_lr"] for h in eager.history])
    # A graphed run's checkpoint resumes on the CPU, eagerly.
    state = kept["state"]
    assert isinstance(state["optimizer"]["param_groups"][0]["lr"], float)
    resumed = fit(dataclasses.replace(config, device="cpu"),
                  resume=torch.utils._pytree.tree_map(
                      lambda t: t.cpu() if torch.is_tensor(t) else t, state))
    assert len(resumed.history) == config.epochs
    assert resumed.metrics["test_neg_elbo"] == pytest.approx(last["test_neg_elbo"], rel=0.05)


@cuda
def test_graphed_ensemble_trains_every_member():
    config = dataclasses.replace(DIGITS, device="cuda", epochs=6, cuda_graph=True)
    results = fit_ensemble(config, betas=[0.2, 1.0, 3.0])
    for r in results:
        assert r.history[-1]["train_neg_elbo"] < r.history[0]["train_neg_elbo"]
    rates = [r.metrics["test_rate"] for r in results]
    assert rates[0] > rates[1] > rates[2]


@cuda
def test_streams_strategy_computes_what_the_loop_computes():
    from echo.ensemble import Ensemble
    x = (torch.rand(3, 50, 1, 28, 28, device="cuda") < 0.2).float()
    grads = {}
    for strategy in ("loop", "streams"):
        ensemble = Ensemble.build("echo", [0.5, 1.0, 2.0], seeds=[0, 1, 2], arch="conv",
                                  latent_dim=8, device="cuda", strategy=strategy)
        torch.manual_seed(0)                 # the same noise draws, in the same order
        out = ensemble(x)
        out.loss.backward()
        torch.cuda.synchronize()
        grads[strategy] = (out.member_loss.detach(), [p.grad.clone() for p in ensemble.parameters()])
    # equal up to cuDNN's choice of kernels (no bitwise determinism on a GPU)
    torch.testing.assert_close(grads["streams"][0], grads["loop"][0], rtol=1e-5, atol=1e-4)
    for a, b in zip(grads["streams"][1], grads["loop"][1]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


@cuda
def test_graphed_streams_ensemble_trains_every_member():
    config = dataclasses.replace(DIGITS, device="cuda", epochs=6, cuda_graph=True)
    results = fit_ensemble(config, betas=[0.2, 1.0, 3.0], strategy="streams")
    rates = [r.metrics["test_rate"] for r in results]
    assert rates[0] > rates[1] > rates[2]
