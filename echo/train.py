"""Train one model (the paper's recipe by default).

    python -m echo.train --method echo --dataset binary_mnist --beta 1.0 --epochs 200 --out runs/x

Adam 3e-4, batch 100, learning rate constant for the first half of training and then linearly
decayed to 0 (App. B). Data sets live on the device and are batched by indexing. Each epoch
reports train and test rate, distortion and -ELBO (= rate + distortion, whatever beta) in nats.
The loop itself is echo/loop.py (shared with echo.ensemble); the settings echo/settings.py.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .checkpoint import load_checkpoint, load_model, make_model, save_checkpoint, write_run
from .compiling import compile_model
from .device import device_problem, place_model, resolve_device, tune_backends
from .files import atomic_write
from .graphs import GraphCaptureError, GraphedStep
from .loop import (NonFiniteLossError, beta_factor, device_data, float32_beta, load_train_test,
                   lr_factor, train_members)
from .methods import Autoencoder, check_method_options, method_options
from .metrics import (EPOCH_METRICS, METRIC_NAMES, batches, evaluate, evaluation_step,
                      iwae_neg_log_likelihood, metric_sums)
from .settings import BETA_WARMUP_STEPS, TrainConfig, add_arguments, from_arguments

# The training API in one import (`from echo.train import fit, TrainConfig, load_model, ...`);
# each name is defined in the module it is imported from above.
__all__ = ["BETA_WARMUP_STEPS", "EPOCH_METRICS", "METRIC_NAMES", "FitResult", "GraphCaptureError",
           "NonFiniteLossError", "TrainConfig", "atomic_write", "batches", "beta_factor",
           "compile_model", "device_data", "device_problem", "evaluate", "evaluation_step", "fit",
           "iwae_neg_log_likelihood", "load_checkpoint", "load_model", "load_train_test",
           "lr_factor", "main", "make_model", "metric_sums", "place_model", "resolve_device",
           "save_checkpoint", "tune_backends"]


@dataclass
class FitResult:
    model: Autoencoder
    history: list[dict]          # one dict of metrics per epoch
    metrics: dict                # the last epoch's metrics
    stopped: str | None = None   # an ensemble member whose loss turned non-finite: why


class _SingleModel:
    """The loop's Trainee for one model: a plain module (compiled, CUDA-graphed where asked)."""
    stacked = False

    def __init__(self, model: Autoencoder, config: TrainConfig, x_test: Tensor,
                 device: torch.device, graphs: bool):
        self.step_model = compile_model(model, device) if config.compile else model
        # beta as a device tensor updated in place before each step, so that a captured CUDA
        # graph (which would freeze a Python float) follows the warm-up.
        self.beta_now = torch.zeros((), device=device)
        self.model, self.config, self.x_test = model, config, x_test
        self.eval_step = GraphedStep(evaluation_step(model, config.beta), enabled=graphs)

    def parameters(self):
        return self.model.parameters()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out = self.step_model(x[0], self.beta_now)
        return out.loss, out.rate.unsqueeze(0), out.distortion.unsqueeze(0)

    def scale_betas(self, fraction: float) -> None:
        self.beta_now.fill_(float32_beta(self.config.beta * fraction))

    def evaluate(self) -> list[dict]:
        return [evaluate(self.model, self.x_test, self.config.batch_size, self.config.beta,
                         step=self.eval_step)]

    def member_model(self, k: int) -> Autoencoder:
        return self.model

    def member_state(self, k: int, optimizer) -> tuple[dict, dict]:
        return self.model.state_dict(), optimizer.state_dict()

    def load_members(self, models: list[dict], optimizers: list[dict], optimizer) -> None:
        self.model.load_state_dict(models[0])
        optimizer.load_state_dict(optimizers[0])


def fit(config: TrainConfig, *, on_epoch: Callable[[int, dict, Callable[[], dict]], None] | None = None,
        resume: dict | None = None) -> FitResult:
    """Train one model. `on_epoch(epoch, record, state)` is called after every epoch with its
    record (echo.metrics.EPOCH_METRICS + `epoch`); `state()` builds the checkpoint dict
    (echo/checkpoint.py) that `fit(config, resume=...)` continues from. With `config.out`,
    checkpoint.pt and metrics.json are written there at the end."""
    def single(models, device, x_test, graphs):
        model = place_model(models[0], device, channels_last=not config.compile)
        return _SingleModel(model, config, x_test, device, graphs)

    trainee, (member,), state = train_members(
        config, [config], single, describe=f"{config.method} β={config.beta}",
        resume=None if resume is None else [resume],
        on_epoch=None if on_epoch is None else
        lambda epoch, records, states: on_epoch(epoch, records[0], lambda: states()[0]))
    if config.out is not None:
        write_run(config.out, state()[0])
    history = member.history
    return FitResult(model=trainee.model, history=history, metrics=history[-1] if history else {})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m echo.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    # Checked before anything loads, one line each: a device this machine lacks (else a CUDA
    # traceback after the data has loaded), and the method's own rules on its options (the
    # same as params.yaml's), named as flags.
    problem = device_problem(args.device)
    if problem:
        print(f"error: --device {args.device}: {problem}; use --device auto or cpu",
              file=sys.stderr)
        return 2
    try:
        config = from_arguments(args)
        check_method_options(config.method, config.method_options, training=config,
                             names={**{o: f"--option {o}" for o in method_options(config.method)},
                                    "batch_size": "--batch-size"})
        result = fit(config)
    except (ValueError, NonFiniteLossError, GraphCaptureError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result.metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
