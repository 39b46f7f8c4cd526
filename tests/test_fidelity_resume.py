"""The full-budget fidelity benchmark (issue 23) survives being stopped: a run stopped after any
epoch continues from its checkpoint when the same command runs again, with the results of an
uninterrupted run; a finished run is skipped; a checkpoint of other settings is refused by
name. And Echo's f_range option: f = tanh(a / k) starts equally spread whatever k."""
import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from echo import build_model
from support import REPO

TINY = ["--arch", "mlp", "--methods", "echo,vae", "--seeds", "0", "--epochs", "3",
        "--train-images", "300", "--test-images", "200", "--jobs", "1", "--iwae-k", "4"]


def bench(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.fidelity", *TINY, "--out", str(out),
                           *extra], cwd=REPO, capture_output=True, text=True, timeout=600)


def curve(path: Path) -> list[dict]:
    with open(path, newline="") as fh:   # epoch_seconds is a wall time: not compared
        return [{k: v for k, v in row.items() if k != "epoch_seconds"}
                for row in csv.DictReader(fh)]


@pytest.mark.slow
def test_a_stopped_run_resumes_to_the_uninterrupted_result_and_a_finished_one_is_skipped(
        mnist_dir, tmp_path):
    whole = bench(tmp_path / "whole", "--data-root", str(mnist_dir))
    assert whole.returncode == 0, whole.stderr[-3000:]
    # Stopped after its first epoch (the time limit passes at once), then the same command.
    stopped = bench(tmp_path / "split", "--data-root", str(mnist_dir), "--time-limit", "0.001")
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    first = json.loads((tmp_path / "split" / "runs" / "echo_seed0.json").read_text())
    assert first["epochs"] == 1 and first["finished"] is False
    resumed = bench(tmp_path / "split", "--data-root", str(mnist_dir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "echo seed 0: resuming after epoch 1 of 3" in resumed.stdout
    for method in ("echo", "vae"):
        a = curve(tmp_path / "whole" / "runs" / f"{method}_seed0.csv")
        b = curve(tmp_path / "split" / "runs" / f"{method}_seed0.csv")
        assert [r["epoch"] for r in b] == ["1", "2", "3"] and a == b, method
        final = json.loads((tmp_path / "split" / "runs" / f"{method}_seed0.json").read_text())
        assert final["finished"] and final["epochs"] == 3
    vae_iwae = json.loads((tmp_path / "split" / "runs" / "vae_seed0.json").read_text())
    assert vae_iwae["iwae_k"] == 4 and math.isfinite(vae_iwae["test_iwae_neg_log_lik"])
    # Once more: nothing to train.
    again = bench(tmp_path / "split", "--data-root", str(mnist_dir))
    assert again.stdout.count("), skipped") == 2, again.stdout[-2000:]
    table = (tmp_path / "split" / "table.md").read_text()
    assert "echo − vae:" in table and "| vae |" in table and "| echo |" in table
    # The same folder with other settings: refused by name, nothing overwritten.
    other = bench(tmp_path / "split", "--data-root", str(mnist_dir), "--lr", "0.001")
    assert other.returncode == 1 and "other settings (lr)" in other.stderr
    assert curve(tmp_path / "split" / "runs" / "echo_seed0.csv") == \
        curve(tmp_path / "whole" / "runs" / "echo_seed0.csv")


def test_f_range_keeps_the_starting_code_and_slows_the_f_head():
    x = torch.rand(64, 1, 28, 28).round()
    codes = {}
    for k in (1.0, 16.0):
        torch.manual_seed(0)
        model = build_model("echo", arch="mlp", latent_dim=8, f_range=k)
        h = model.encoder(x)
        codes[k] = model.channel.heads(h)[0]
        assert model.channel.f_range == k
    # The same f at the start (the head's init scaled by k) ...
    assert torch.allclose(codes[1.0], codes[16.0], atol=1e-6)
    assert codes[16.0].std() > 0.1
    # ... and the f head's weights carry k: one Adam step moves tanh's argument k times less.
    torch.manual_seed(0)
    wide = build_model("echo", arch="mlp", latent_dim=8, f_range=16.0)
    assert wide.channel.f_head.weight.abs().mean() > 10 * codes[1.0].new_tensor(
        build_model("echo", arch="mlp", latent_dim=8).channel.f_head.weight.abs().mean())


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), "16"])
def test_a_bad_f_range_is_refused_by_name(bad):
    with pytest.raises(ValueError, match="f_range must be a number > 0"):
        build_model("echo", arch="mlp", latent_dim=8, f_range=bad)
