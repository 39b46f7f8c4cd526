"""The numbers every run reports, in nats: rate, distortion and -ELBO = rate + distortion, as
sums kept on the device during an epoch and means at its end; the IWAE bound on -log p(x)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .methods import Autoencoder

METRIC_NAMES = ("rate", "distortion", "neg_elbo")
# The epoch record: every value a run reports per epoch, in this order, beside its `epoch`.
# `fit` returns it (history), checkpoints keep it, and the sweep reports it to Tune, logs it to
# MLflow (step = epoch), writes the last one to results/sweep.csv and backfills MLflow from a
# checkpoint's history: adding a value here is all it takes. Its names must not be settings'
# (a setting column of sweep.csv would be overwritten): hence `epoch_lr`, the learning rate
# the schedule had reached at the epoch's end, beside the `lr` setting it started from.
EPOCH_METRICS = ("epoch_lr", "epoch_seconds",
                 *(f"{split}_{name}" for split in ("train", "test")
                   for name in (*METRIC_NAMES, "loss")))
IWAE_ROWS = 2000            # images decoded at once by the IWAE bound (bounds memory)


def batches(n: int, batch_size: int, *, shuffle: bool, generator=None, device=None):
    """Index tensors of each batch. Training drops a last batch smaller than half a batch
    (Echo noise needs other examples); evaluation folds a tiny remainder into the last batch."""
    order = torch.randperm(n, generator=generator, device=device) if shuffle else \
        torch.arange(n, device=device)
    chunks = list(order.split(batch_size))
    if len(chunks) > 1 and len(chunks[-1]) < 2:
        chunks[-2] = torch.cat([chunks[-2], chunks.pop()])
    return chunks


def metric_sums(out) -> Tensor:
    """[summed rate, summed distortion] of a batch, kept on the device until the epoch ends."""
    return torch.stack([out.rate.sum(), out.distortion.sum()]).detach()


def mean_metrics(sums: Tensor, count: int) -> dict:
    """rate, distortion and -ELBO = rate + distortion from summed rates and distortions.
    The sums are float64 and -ELBO is derived rather than summed a third time, so the
    numbers do not depend on float32 reduction order."""
    rate, distortion = (sums / count).tolist()
    return {"rate": rate, "distortion": distortion, "neg_elbo": rate + distortion}


def loss_of(metrics: dict, beta: float) -> float:
    """The objective trained, D + beta R, from mean metrics (after the warm-up; a method's
    extra penalty, InfoVAE's MMD, is not in it): the search metric `train_/test_loss`."""
    return metrics["distortion"] + beta * metrics["rate"]


def epoch_record(train: dict, test: dict, *, beta: float, lr: float, seconds: float) -> dict:
    """One epoch's record (EPOCH_METRICS) from its mean train and test metrics."""
    record = {"epoch_lr": lr, "epoch_seconds": seconds}
    for split, metrics in (("train", train), ("test", test)):
        record.update({f"{split}_{name}": metrics[name] for name in METRIC_NAMES})
        record[f"{split}_loss"] = loss_of(metrics, beta)
    return record


def upgrade_record(entry: dict, beta: float) -> dict:
    """An epoch record of an older checkpoint in today's form: its `lr` is `epoch_lr`, and
    the losses it lacked are derived from its own rate and distortion (as `epoch_record`
    does), so a run resumed or backfilled from it reports every value of EPOCH_METRICS."""
    entry = dict(entry)
    if "lr" in entry and "epoch_lr" not in entry:
        entry["epoch_lr"] = entry.pop("lr")
    for split in ("train", "test"):
        if f"{split}_loss" not in entry and all(f"{split}_{n}" in entry
                                                for n in ("rate", "distortion")):
            entry[f"{split}_loss"] = loss_of({"rate": entry[f"{split}_rate"],
                                              "distortion": entry[f"{split}_distortion"]}, beta)
    return entry


def evaluation_step(model: Autoencoder, beta: float = 1.0) -> Callable[[Tensor], Tensor]:
    """The metric sums of one evaluation batch, without gradients (a `GraphedStep` can wrap it)."""
    @torch.no_grad()
    def step(x: Tensor) -> Tensor:
        return metric_sums(model(x, beta))
    return step


@torch.no_grad()
def evaluate(model: Autoencoder, x: Tensor, batch_size: int, beta: float = 1.0, *,
             step: Callable[[Tensor], Tensor] | None = None) -> dict:
    """Mean rate, distortion and -ELBO (nats) over a data set, without gradients.
    `step`: the batch function to use (default `evaluation_step(model, beta)`)."""
    step = step if step is not None else evaluation_step(model, beta)
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=x.device)
    for idx in batches(len(x), batch_size, shuffle=False, device=x.device):
        sums += step(x[idx])
    model.train()
    return mean_metrics(sums, len(x))


@torch.no_grad()
def iwae_neg_log_likelihood(model: Autoencoder, x: Tensor, k: int, batch_size: int) -> float:
    """Mean -IWAE_k (nats) over x, an upper bound on -log p(x) that tightens as k grows."""
    model.eval()
    total = 0.0
    for idx in batches(len(x), batch_size, shuffle=False, device=x.device):
        chunk = max(1, min(k, IWAE_ROWS // len(idx)))     # samples decoded at once per batch
        total += float(model.iwae_bound(x[idx], k=k, chunk=chunk).sum())
    model.train()
    return -total / len(x)
