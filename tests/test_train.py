"""Real training: -ELBO falls on MNIST for echo and vae; checkpoints round-trip; CLI; schedule."""
import json
import subprocess
import sys

import pytest
import torch

from echo import build_model
from echo.data import load_dataset
from echo.train import (TrainConfig, evaluate, fit, load_checkpoint, load_model, lr_factor,
                         make_model)


@pytest.mark.parametrize("method", ["echo", "vae"])
def test_a_few_hundred_steps_on_mnist_lower_the_negative_elbo(method, mnist_dir, tmp_path):
    config = TrainConfig(method=method, dataset="binary_mnist", data_root=str(mnist_dir),
                         arch="mlp", epochs=3, train_limit=10_000, test_limit=1000, seed=0,
                         progress=False, out=str(tmp_path))
    torch.manual_seed(config.seed)
    x_test = load_dataset("binary_mnist", "test", mnist_dir)[0][:1000]
    initial = evaluate(make_model(config, (1, 28, 28)), x_test, 100)["neg_elbo"]  # ~545 nats
    result = fit(config)            # 3 epochs x 100 steps
    first, last = result.history[0], result.history[-1]
    assert last["test_neg_elbo"] < first["test_neg_elbo"]
    assert last["test_neg_elbo"] < 0.45 * initial
    for m in result.history:
        assert m["test_neg_elbo"] == pytest.approx(m["test_rate"] + m["test_distortion"], rel=1e-5)
        assert m["test_rate"] > 0
    # The checkpoint loads safely and rebuilds the same network.
    model, loaded_config = load_model(tmp_path / "checkpoint.pt")
    assert loaded_config.method == method
    z = torch.randn(3, 32)
    assert torch.equal(model.decoder(z), result.model.decoder.cpu()(z))
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["test_neg_elbo"] == pytest.approx(last["test_neg_elbo"])


def test_echo_rate_respects_the_low_rate_limit():
    model = build_model("echo", arch="mlp", input_shape=(1, 8, 8), latent_dim=5)
    out = model(torch.rand(20, 1, 8, 8).bernoulli())
    r = model.channel.clip_factor
    assert (out.rate >= -5 * torch.log(torch.tensor(r)) - 1e-5).all()


def test_training_is_seeded_and_resumes_exactly(tmp_path):
    base = dict(method="echo", dataset="digits", arch="mlp", epochs=4, progress=False)
    full = fit(TrainConfig(**base)).history
    again = fit(TrainConfig(**base)).history
    strip = lambda h: [{k: v for k, v in m.items() if k != "epoch_seconds"} for m in h]
    assert strip(again) == strip(full)
    # Stop after two epochs, save the state, resume: the same numbers as one uninterrupted run.
    states = {}
    fit(TrainConfig(**base), on_epoch=lambda e, m, state: states.__setitem__(e, state()))
    torch.save(states[2], tmp_path / "mid.pt")
    resumed = fit(TrainConfig(**base), resume=load_checkpoint(tmp_path / "mid.pt")).history
    assert strip(resumed) == strip(full)


def test_learning_rate_is_constant_then_decays_linearly_to_zero():
    total = 1000
    assert lr_factor(0, total, 0.5) == 1.0
    assert lr_factor(499, total, 0.5) == 1.0
    assert lr_factor(750, total, 0.5) == pytest.approx(0.5)
    assert lr_factor(1000, total, 0.5) == 0.0


def test_cli_trains_and_writes_metrics_and_checkpoint(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "echo.train", "--method", "vae", "--dataset",
                           "digits", "--arch", "mlp", "--epochs", "2", "--out", str(out),
                           "--no-progress"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epoch"] == 2 and metrics["test_neg_elbo"] > 0
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["config"]["method"] == "vae"


def test_cli_reports_bad_input_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "echo.train", "--method", "nope", "--dataset",
                           "digits", "--arch", "mlp", "--epochs", "1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown method 'nope'" in proc.stderr and not (tmp_path / "run").exists()
