"""The models learn: rates above their floors, distortions well below the pixel-marginal model.

A model that learned nothing from its code has the pixel-marginal distortion (~203 nats on binary
MNIST) and, for Echo, the rate of its low-rate limit (-32 log r = 5.74 nats). Before the fix of
docs/methods.md ("Why the conv models did not learn") the conv Echo model sat exactly there, and
a test that only asked for a falling loss passed it. These tests fail on such a model.
"""
import numpy as np
import pytest
import torch

from echo import METHODS, build_model, clip_factor, echo_low_rate_limit, method_options
from echo.data import load_dataset
from echo.networks import pixel_marginal_nll
from echo.train import TrainConfig, fit

ECHO_FLOOR_32 = echo_low_rate_limit(clip_factor(99), 32)
SMALL_FLOWS = {"flow_hidden": 128}         # for every method with flows (mlp_results says why)


# Session scope: under xdist a worker runs the conv tests apart from the MLP group (and from
# each other); it loads the images once all the same.
@pytest.fixture(scope="session")
def mnist_10k(mnist_dir, tmp_path_factory):
    """The first 10k training and 1000 test images of binary MNIST, binarized once and written as
    a prepared .npz: each of this module's 12 runs then loads 8 MB instead of binarizing all
    70k images again (~1.2 CPU s a run). The same images as data_root with train/test limits."""
    x_train = load_dataset("binary_mnist", "train", mnist_dir)[0][:10_000]
    x_test = load_dataset("binary_mnist", "test", mnist_dir)[0][:1000]
    path = tmp_path_factory.mktemp("fidelity") / "binary_mnist_10k.npz"
    np.savez(path, train_x=x_train.numpy().astype(np.uint8), train_y=np.zeros(len(x_train), int),
             test_x=x_test.numpy().astype(np.uint8), test_y=np.zeros(len(x_test), int))
    return path, x_train, x_test


@pytest.fixture(scope="session")
def marginal(mnist_10k) -> float:
    _, x_train, x_test = mnist_10k
    return pixel_marginal_nll(x_train, x_test)


def learned(method: str, arch: str, mnist_10k, **overrides) -> dict:
    config = TrainConfig(method=method, dataset="binary_mnist", prepared=str(mnist_10k[0]),
                         arch=arch, latent_dim=32, seed=0, progress=False, **overrides)
    return fit(config).metrics


# The conv tests train on smaller batches than the paper's 100 (its learning rate, architecture
# and 32 latents are kept), 100 steps an epoch: a step's cost is proportional to the batch.
# Echo's noise then sums batch - 1 other samples with the clipping factor solved for that many
# terms, so its rate floor is -32 log r(39) = 13.9 nats at batch 40, not 5.7 (r(99)).
CONV_BATCH = {"echo": 40, "vae": 25}
ECHO_FLOOR_CONV = echo_low_rate_limit(clip_factor(CONV_BATCH["echo"] - 1), 32)


@pytest.mark.slow
@pytest.mark.parametrize("method, epochs", [("echo", 3), ("vae", 2)])
def test_paper_conv_models_learn_at_the_paper_learning_rate(method, epochs, mnist_10k, marginal):
    # 100 steps an epoch at the paper's lr 3e-4 (held constant), beta warmed up over the first
    # half. Echo keeps 300 steps: at 200 (batch 100, warm-up 100) seed 2 stopped at distortion
    # 24.8 below the marginal and rate 5.2 above the floor, under the 25 and just over the 5
    # asked. The VAE clears every threshold at 200 steps.
    # Batches (issue 25), measured with the thresholds below, seeds 0-2, nats past each
    # threshold (distortion, rate, -ELBO), one thread:
    # - echo, batch 50: 36.6/6.2/29.2, 46.3/8.1/37.0, 33.0/5.4/26.4 (112 CPU-s, seed 0);
    #   batch 40: 36.1/5.7/26.5, 44.1/6.1/34.1, 27.7/3.7/20.0 (84-99 CPU-s); batch 25 is too
    #   small: rate 1.6, 2.8 and 0.4 nats past its floor of 22.2;
    # - vae, batch 50: 32.4/10.1/32.4, 37.3/12.2/35.1, 27.1/9.9/27.2 (75-82 CPU-s); batch 25:
    #   19.9/9.9/20.0, 19.8/7.3/22.5, 16.7/8.2/18.5 (39-46 CPU-s).
    # At batch 100: ~190 CPU-s (echo) and ~125 (vae).
    # Without the fix (PyTorch's default init, no warm-up) Echo at 200 steps of batch 100 sits
    # on its floor (rate 5.74, distortion 0.6 above the marginal) and fails.
    batch = CONV_BATCH[method]
    m = learned(method, "conv", mnist_10k, epochs=epochs, lr=3e-4, lr_decay_start=1.0,
                batch_size=batch, train_limit=100 * batch, beta_warmup_steps=50 * epochs)
    assert 195 < marginal < 210
    assert m["test_distortion"] < marginal - 25, m
    assert m["test_rate"] > (ECHO_FLOOR_CONV if method == "echo" else 0) + 5, m
    assert m["test_neg_elbo"] < marginal - 10, m


@pytest.fixture(scope="module")
def mlp_results(mnist_10k) -> dict:
    """Every Table-2 method trained once at MLP scale: 300 steps at lr 1e-3 (10k images), shared
    by the learning and the MMD tests.

    300 steps, not the 500 of before (~40% less of this module's time): measured at 300 steps,
    seed 0, the thresholds below still hold with room for every method; the smallest margins
    were echo's -ELBO (55.1 nats below the marginal against the 50 asked; 55.3 with seed 1),
    echo's rate (15.1 nats above its floor against 8), infovae's distortion (74.8 below against
    60), and rate ratios 0.87 (infovae/vae) and 0.88 (iaf-mmd/iaf-prior) against 0.75.

    The flows have 128 hidden units instead of the paper's 640 (SMALL_FLOWS): 2-5x faster (one
    thread: iaf-maf 137 -> 29 s, iaf-prior 72 -> 19, iaf-mmd 65 -> 20, iaf-vamp 76 -> 29,
    vae-maf 54 -> 19 on a loaded machine) with the same margins within 3 nats (seed 0, 640 ->
    128, nats past each threshold: iaf-maf distortion 28.4 -> 27.7, rate 7.6 -> 8.9, -ELBO 22.7
    -> 20.8; iaf-mmd 16.7 -> 16.2, 8.3 -> 9.0, 10.5 -> 9.3; iaf-mmd/iaf-prior rates 0.88 ->
    0.87). The paper's sizes are trained by tests/test_methods.py (conv) and checked by its
    test_paper_defaults."""
    cache: dict = {}

    def result(method: str) -> dict:
        if method not in cache:
            small = {k: v for k, v in SMALL_FLOWS.items() if k in method_options(method)}
            cache[method] = learned(method, "mlp", mnist_10k, epochs=3, lr=1e-3,
                                    beta_warmup_steps=100, method_options=small)
        return cache[method]
    return result


@pytest.mark.xdist_group("fidelity_mlp")           # mlp_results trains each method once
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_table2_method_learns_at_mlp_scale(method, mlp_results, marginal):
    m = mlp_results(method)
    assert m["test_distortion"] < marginal - 60, m
    assert m["test_rate"] > (ECHO_FLOOR_32 if method == "echo" else 0) + 8, m
    assert m["test_neg_elbo"] < marginal - 50, m


@pytest.mark.xdist_group("fidelity_mlp")
@pytest.mark.parametrize("mmd_method, base", [("infovae", "vae"), ("iaf-mmd", "iaf-prior")])
def test_mmd_penalty_does_not_collapse_the_rate(mmd_method, base, mlp_results):
    # Table 2: InfoVAE's rate is the VAE's (25.6 vs 25.9 nats). With the previous bandwidth
    # (sigma = sqrt(D)) infovae's rate was about half the VAE's here, and 0.0015 on digits.
    with_mmd, without = mlp_results(mmd_method), mlp_results(base)
    assert with_mmd["test_rate"] > 0.75 * without["test_rate"], (with_mmd, without)


def test_signal_reaches_the_code_and_the_logits_at_initialisation(mnist_10k):
    # PyTorch's default init left encoder features varying across images by ~1e-3 and the conv
    # decoder's logits across codes by ~4e-5: nothing to learn from at the start.
    x = mnist_10k[1][:100]
    torch.manual_seed(0)
    for arch in ("conv", "mlp"):
        model = build_model("vae", arch=arch, latent_dim=32)
        with torch.no_grad():
            h = model.encoder(x)
            logits = model.decoder(torch.randn(100, 32))
        assert h.std(0).mean() > 0.05, arch
        assert logits.std(0).mean() > 0.1, arch


@pytest.mark.slow
def test_table2_gpu_command_runs_in_miniature_on_the_cpu(mnist_dir, tmp_path):
    # The exact script of the one GPU call (issue 14), scaled down by its environment knobs.
    import csv
    import os
    import subprocess
    from pathlib import Path
    # Two processes for the three runs (JOBS=2, the GPU call's 3): one process then trains a
    # second run after its first, as in the MLP call (27 runs, JOBS=6); one process fewer to
    # start (~10 CPU-s of imports).
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OUT": str(tmp_path), "EPOCHS": "2", "TRAIN_IMAGES": "200",
           "TEST_IMAGES": "100", "DEVICE": "cpu", "IWAE_K": "3", "THREADS": "1", "JOBS": "2",
           "TIME_LIMIT": "0", "DATA_ROOT": str(mnist_dir)}
    proc = subprocess.run(["bash", str(repo / "benchmarks" / "table2_gpu.sh")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp_path / "binary_mnist_table.csv", newline="") as fh:
        rows = {r["method"]: r for r in csv.DictReader(fh)}
    assert set(rows) == {"echo", "vae", "iaf-prior"}
    for method, row in rows.items():
        assert int(row["epochs"]) == 2 and float(row["neg_elbo"]) > 0
        assert float(row["neg_elbo"]) == pytest.approx(float(row["rate"]) + float(row["distortion"]))
        # IWAE only where the marginal is a density; it bounds -log p(x) below the -ELBO.
        if method == "echo":
            assert row["iwae_k"] == "0"
        else:
            assert int(row["iwae_k"]) == 3 and float(row["iwae_neg_log_lik"]) <= float(row["neg_elbo"]) + 1
    for name in ("summary.csv", "table.md", "neg_elbo.png", "run.json"):
        assert (tmp_path / "fidelity" / name).exists(), name
    assert (tmp_path / "log.txt").read_text().count("epoch 2/2") == 3
