"""The one training loop, for a single model (`echo.train.fit`) and for K models trained side by
side (`echo.ensemble.fit_ensemble`): the data on the device, Adam and its schedule, the epoch
loop, the non-finite check, an epoch's metrics and the checkpoints, each written once here.

A `Trainee` is what the loop trains: K >= 1 members with one optimiser. The loop hands it one
batch per member ([K, B, ...], every member its own batch order, as K separate runs would
have) and gets back each member's summed rate and distortion ([K, 2]). A member whose
training loss turns NaN or infinite stops with its reason and the others go on; when no member
is left the run fails with `NonFiniteLossError` (for a single model: at once).
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch import Tensor

from .checkpoint import run_likelihood
from .data import load_dataset, load_prepared
from .graphs import graph_ready_adam
from .metrics import batches, mean_metrics
from .settings import TrainConfig

FLOAT32_MAX = float(torch.finfo(torch.float32).max)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run cannot continue."""


def lr_factor(step: int, total_steps: int, decay_start: float) -> float:
    """1 until `decay_start` of training, then linearly down to 0 at the last step."""
    start = int(decay_start * total_steps)
    if step < start:
        return 1.0
    return max(0.0, (total_steps - step) / max(1, total_steps - start))


def beta_factor(step: int, warmup_steps: int) -> float:
    """The fraction of beta used at optimiser step `step` (0-based): (step + 1) / warmup_steps
    during the warm-up, then 1. The objective trained after the warm-up, and every reported
    rate and distortion, are the paper's; only the first steps weigh the rate less."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)


def float32_beta(beta: float) -> float:
    """A beta beyond float32's range is inf, as a float32 product would be: the loss then turns
    non-finite and the run stops with that reason."""
    return beta if beta < FLOAT32_MAX else math.inf


def load_train_test(config: TrainConfig) -> tuple[Tensor, Tensor]:
    """Training and test images, from a prepared .npz when given, else from the raw files."""
    if config.prepared is not None:
        return (load_prepared(config.prepared, "train")[0], load_prepared(config.prepared, "test")[0])
    return (load_dataset(config.dataset, "train", config.data_root)[0],
            load_dataset(config.dataset, "test", config.data_root)[0])


def device_data(config: TrainConfig, device: torch.device) -> tuple[Tensor, Tensor]:
    """The training and test images cut to the configured limits and moved to the device once,
    to be batched by indexing; refuses a batch larger than the training set, and data the
    run's decoder cannot model (values outside [0, 1] for a Bernoulli)."""
    x_train, x_test = load_train_test(config)
    likelihood = run_likelihood(config)       # e.g. a Bernoulli decoder needs values in [0, 1]
    for split, x in (("training", x_train), ("test", x_test)):
        likelihood.check_data(x, f"the {split} data of {config.dataset}")
    x_train = x_train[: config.train_limit].to(device)
    x_test = x_test[: config.test_limit].to(device)
    if len(x_train) < config.batch_size:
        raise ValueError(f"batch_size={config.batch_size} exceeds the {len(x_train)} training "
                         f"examples of {config.dataset}")
    return x_train, x_test


def adam_with_schedule(parameters, config: TrainConfig, steps_per_epoch: int, *, graphs: bool):
    """Adam at `config.lr`, constant for `lr_decay_start` of training, then linearly to 0."""
    optimizer = torch.optim.Adam(parameters, lr=config.lr)
    if graphs:
        graph_ready_adam(optimizer, optimizer.param_groups[0]["params"][0].device)
    total_steps = config.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, config.lr_decay_start))
    return optimizer, scheduler


class Trainee(Protocol):
    """What `train_epochs` trains (a model, or an ensemble of K)."""

    def step(self, x: Tensor) -> Tensor:
        """One optimiser step on one batch per member [K, B, ...]; each member's [rate,
        distortion] sums [K, 2], left on the device."""

    def scale_betas(self, fraction: float) -> None:
        """Train the next steps at `fraction` of each member's beta (the warm-up)."""

    def evaluate(self) -> list[dict]:
        """Each member's mean test rate, distortion and -ELBO."""


@dataclass
class Member:
    """One member's run: its settings (beta, seed), its history and, if it stopped early, why."""
    config: TrainConfig
    history: list[dict] = field(default_factory=list)
    stopped: str | None = None


def epoch_orders(n: int, members: int, device) -> Tensor:
    """Every member its own random order of the n training examples [K, n]."""
    return torch.stack([torch.randperm(n, device=device) for _ in range(members)])


def train_epochs(config: TrainConfig, trainee: Trainee, members: list[Member], x_train: Tensor,
                 optimizer, scheduler, *, first_epoch: int = 1,
                 on_epoch: Callable[[int, list[dict | None]], None] | None = None,
                 describe: str = "") -> None:
    """Epochs `first_epoch`..`config.epochs`. After each, every member still training gets its
    metrics (`epoch`, `lr`, `epoch_seconds`, `train_*`, `test_*`, + `member`, `beta`, `seed` for
    an ensemble) appended to its history, and `on_epoch(epoch, metrics)` sees them (None for a
    member that has stopped)."""
    k = len(members)
    sizes = [len(i) for i in batches(len(x_train), config.batch_size, shuffle=False)]
    progress = progress_bar(config, first_epoch, describe or config.method)
    for epoch in range(first_epoch, config.epochs + 1):
        start = time.perf_counter()
        sums = torch.zeros(k, 2, dtype=torch.float64, device=x_train.device)
        seen = 0
        for idx in epoch_orders(len(x_train), k, x_train.device).split(sizes, dim=1):
            trainee.scale_betas(beta_factor(scheduler.last_epoch, config.beta_warmup_steps))
            sums += trainee.step(x_train[idx])
            scheduler.step()
            seen += idx.shape[1]
        train = [mean_metrics(row, seen) for row in sums]
        stop_nonfinite(members, train, epoch)
        test = trainee.evaluate()
        lr, seconds = float(optimizer.param_groups[0]["lr"]), time.perf_counter() - start
        epoch_metrics: list[dict | None] = []
        for i, member in enumerate(members):
            if member.stopped:
                epoch_metrics.append(None)
                continue
            metrics = {"epoch": epoch, "lr": lr, "epoch_seconds": seconds,
                       **({"member": i, "beta": member.config.beta, "seed": member.config.seed}
                          if k > 1 else {}),
                       **{f"train_{n}": v for n, v in train[i].items()},
                       **{f"test_{n}": v for n, v in test[i].items()}}
            member.history.append(metrics)
            epoch_metrics.append(metrics)
        progress(epoch, [m for m in epoch_metrics if m is not None])
        if on_epoch is not None:
            on_epoch(epoch, epoch_metrics)


def stop_nonfinite(members: list[Member], train: list[dict], epoch: int) -> None:
    """Stop each member whose training metrics are not finite; fail when none is left."""
    for member, metrics in zip(members, train):
        if not member.stopped and not all(math.isfinite(v) for v in metrics.values()):
            member.stopped = f"non-finite training loss at epoch {epoch} ({metrics})"
    if all(m.stopped for m in members):
        if len(members) == 1:
            raise NonFiniteLossError(members[0].stopped)
        raise NonFiniteLossError(
            f"non-finite training loss by epoch {epoch} for every ensemble member "
            f"(beta {[m.config.beta for m in members]}); drop or lower those betas")


def progress_bar(config: TrainConfig, first_epoch: int, describe: str):
    """A tqdm bar over epochs (test rate, distortion and the best -ELBO) when asked for."""
    if not config.progress:
        return lambda epoch, metrics: None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return lambda epoch, metrics: print(
            f"epoch {epoch}: test -ELBO {min(m['test_neg_elbo'] for m in metrics):.2f}",
            file=sys.stderr)
    bar = tqdm(total=config.epochs, initial=first_epoch - 1, desc=describe, unit="epoch")

    def update(epoch: int, metrics: list[dict]) -> None:
        best = min(metrics, key=lambda m: m["test_neg_elbo"])
        bar.set_postfix(rate=f"{best['test_rate']:.2f}", dist=f"{best['test_distortion']:.2f}",
                        neg_elbo=f"{best['test_neg_elbo']:.2f}")
        bar.update(1)
        if epoch == config.epochs:
            bar.close()
    return update
