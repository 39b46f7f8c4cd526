"""The one training loop, for a single model (`echo.train.fit`) and for K models trained side by
side (`echo.ensemble.fit_ensemble`): the set-up (data on the device, each member's initial
weights, Adam and its schedule), the resume path, the optimiser step, the epoch loop, the
non-finite check, the epoch record and the checkpoints, each written once here
(`train_members`).

A `Trainee` is what the loop trains: K >= 1 members with one optimiser. The loop hands it one
batch per member ([K, B, ...], every member its own batch order, as K separate runs would
have) and gets back each member's loss, rates and distortions. A member whose training loss
turns NaN or infinite stops with its reason and the others go on; when no member is left the
run fails with `NonFiniteLossError` (for a single model: at once).

The epoch record (`epoch_record`, names in `EPOCH_METRICS`) is what `fit` returns in its
history, what checkpoints keep and what the sweep reports, logs to MLflow, writes to
results/sweep.csv and backfills from a checkpoint: it is defined here and nowhere else.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch import Tensor

from .checkpoint import checkpoint_dict, make_model, run_likelihood, upgrade_history
from .data import load_dataset, load_prepared
from .device import resolve_device, tune_backends
from .graphs import GraphedStep, graph_ready_adam
from .methods import Autoencoder
from .metrics import EPOCH_METRICS, batches, epoch_record, mean_metrics
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
    """What `train_members` trains (a model, or an ensemble of K): built from the members'
    models, it holds their parameters (stacked [K, ...] when `stacked`) for one optimiser."""

    stacked: bool

    def parameters(self):
        """The tensors Adam updates (with a leading member dimension when `stacked`)."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One batch per member [K, B, ...] -> (the summed member losses, a scalar whose
        gradient is each member's own; rates [K, B]; distortions [K, B])."""

    def scale_betas(self, fraction: float) -> None:
        """Train the next steps at `fraction` of each member's beta (the warm-up)."""

    def evaluate(self) -> list[dict]:
        """Each member's mean test rate, distortion and -ELBO."""

    def member_model(self, k: int) -> Autoencoder:
        """Member k as a model of its own (on the training device)."""

    def member_state(self, k: int, optimizer) -> tuple[dict, dict]:
        """Member k's model state_dict and the Adam state_dict its separate run would have."""

    def load_members(self, models: list[dict], optimizers: list[dict], optimizer) -> None:
        """The inverse of `member_state` for every member at once."""


@dataclass
class Member:
    """One member's run: its settings (beta, seed), its history and, if it stopped early, why."""
    config: TrainConfig
    history: list[dict] = field(default_factory=list)
    stopped: str | None = None


def epoch_orders(n: int, members: int, device) -> Tensor:
    """Every member its own random order of the n training examples [K, n]."""
    return torch.stack([torch.randperm(n, device=device) for _ in range(members)])


def clip_member_grads_(parameters, max_norm: float, *, stacked: bool) -> None:
    """Scale each member's gradient down to L2 norm `max_norm` where it is longer, in place:
    `torch.nn.utils.clip_grad_norm_` per member. One norm over an ensemble's stacked
    parameters would couple the members (one member's large gradient would shrink every
    other's); here member k's norm is over slice k of every parameter, so clipping leaves the
    others' gradients as they were. No host synchronisation (a CUDA graph captures it)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    k = grads[0].shape[0] if stacked else 1
    # Per parameter, each member's norm [K]; then the norm of those norms, as torch does.
    norms = torch.stack([torch.linalg.vector_norm(g.reshape(k, -1), dim=1) for g in grads], 1)
    scale = (max_norm / (torch.linalg.vector_norm(norms, dim=1) + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.view((k,) + (1,) * (g.dim() - 1) if stacked else (1,) * g.dim()))


def optimiser_step(trainee: Trainee, optimizer, grad_clip: float | None):
    """The one training step of every run: forward, backward, the gradient clip where asked,
    Adam. Returns each member's [summed rate, summed distortion] [K, 2], left on the device."""
    parameters = list(trainee.parameters())

    def step(x: Tensor) -> Tensor:
        loss, rate, distortion = trainee.forward(x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            clip_member_grads_(parameters, grad_clip, stacked=trainee.stacked)
        optimizer.step()
        return torch.stack([rate.sum(1), distortion.sum(1)], 1).detach()
    return step


def train_members(config: TrainConfig, configs: list[TrainConfig],
                  trainee_for: Callable[[list[Autoencoder], torch.device, Tensor, bool], Trainee],
                  *, on_epoch: Callable[[int, list[dict | None], Callable[[], list[dict]]], None]
                  | None = None, resume: list[dict] | None = None,
                  describe: str = "") -> tuple[Trainee, list[Member], Callable[[], list[dict]]]:
    """Set up, resume and train K members (`configs`: one per member; `config`: the settings
    they share). Member k starts from the weights of its separate run (built after
    `torch.manual_seed(configs[k].seed)`); the random stream of training goes on from there
    (for one member: exactly its separate run's). `trainee_for(models, device, x_test,
    graphs)` builds the Trainee. `resume`: the members' checkpoint dicts, as `state()` gives
    them. Returns the trainee, the members (history, why stopped) and `state()`."""
    device = resolve_device(config.device)
    tune_backends(device)
    torch.manual_seed(configs[0].seed)
    x_train, x_test = device_data(config, device)
    input_shape = tuple(x_train.shape[1:])
    models = []
    for member_config in configs:
        torch.manual_seed(member_config.seed)     # the initial weights of the separate run
        models.append(make_model(member_config, input_shape))
    graphs = config.cuda_graph and device.type == "cuda"
    trainee = trainee_for(models, device, x_test, graphs)
    steps = len(batches(len(x_train), config.batch_size, shuffle=False))
    optimizer, scheduler = adam_with_schedule(trainee.parameters(), config, steps, graphs=graphs)
    members = [Member(c) for c in configs]
    first_epoch = 1
    if resume is not None:
        first_epoch = resume_members(trainee, optimizer, scheduler, members, list(resume),
                                     device, graphs)
    done = {"epoch": first_epoch - 1}        # epochs the loop has finished

    def state() -> list[dict]:
        states = []
        for k, member in enumerate(members):
            model, adam = trainee.member_state(k, optimizer)
            states.append(checkpoint_dict(model=model, optimizer=adam,
                                          scheduler=scheduler.state_dict(), epoch=done["epoch"],
                                          history=member.history, config=member.config,
                                          input_shape=input_shape, stopped=member.stopped))
        return states

    def each_epoch(epoch: int, metrics: list[dict | None]) -> None:
        done["epoch"] = epoch
        if on_epoch is not None:
            on_epoch(epoch, metrics, state)

    train_epochs(config, trainee, members, x_train, optimizer, scheduler,
                 GraphedStep(optimiser_step(trainee, optimizer, config.grad_clip),
                             enabled=graphs),
                 first_epoch=first_epoch, on_epoch=each_epoch, describe=describe)
    return trainee, members, state


def resume_members(trainee: Trainee, optimizer, scheduler, members: list[Member],
                   states: list[dict], device: torch.device, graphs: bool) -> int:
    """Load the members' checkpoint dicts (as `state()` gave them, or `load_checkpoint` read
    them); the next epoch to train. A checkpoint of another beta or seed is refused by name."""
    if len(states) != len(members):
        raise ValueError(f"resume holds {len(states)} member checkpoints for "
                         f"{len(members)} member(s)")
    for i, (member, s) in enumerate(zip(members, states)):
        if float(s["config"]["beta"]) != member.config.beta or int(s["config"]["seed"]) != \
                member.config.seed:
            raise ValueError(f"resume: member {i}'s checkpoint is for beta {s['config']['beta']}, "
                             f"seed {s['config']['seed']}, not beta {member.config.beta}, seed "
                             f"{member.config.seed}")
        member.history = upgrade_history(s["history"], member.config.beta)
        member.stopped = s.get("stopped")
    trainee.load_members([s["model"] for s in states], [s["optimizer"] for s in states],
                         optimizer)
    if graphs:
        graph_ready_adam(optimizer, device)
    scheduler.load_state_dict(states[0]["scheduler"])
    torch.set_rng_state(states[0]["rng"])
    return int(states[0]["epoch"]) + 1


def train_epochs(config: TrainConfig, trainee: Trainee, members: list[Member], x_train: Tensor,
                 optimizer, scheduler, step: Callable[[Tensor], Tensor], *,
                 first_epoch: int = 1,
                 on_epoch: Callable[[int, list[dict | None]], None] | None = None,
                 describe: str = "") -> None:
    """Epochs `first_epoch`..`config.epochs` of `step` (`optimiser_step`, graphed where asked).
    After each, every member still training gets its epoch record (`epoch_record`; + `member`,
    `beta`, `seed` for an ensemble) appended to its history, and `on_epoch(epoch, records)`
    sees them (None for a member that has stopped)."""
    k = len(members)
    sizes = [len(i) for i in batches(len(x_train), config.batch_size, shuffle=False)]
    progress = progress_bar(config, first_epoch, describe or config.method)
    for epoch in range(first_epoch, config.epochs + 1):
        start = time.perf_counter()
        sums = torch.zeros(k, 2, dtype=torch.float64, device=x_train.device)
        seen = 0
        for idx in epoch_orders(len(x_train), k, x_train.device).split(sizes, dim=1):
            trainee.scale_betas(beta_factor(scheduler.last_epoch, config.beta_warmup_steps))
            sums += step(x_train[idx])
            scheduler.step()
            seen += idx.shape[1]
        train = [mean_metrics(row, seen) for row in sums]
        stop_nonfinite(members, train, epoch)
        test = trainee.evaluate()
        lr, seconds = float(optimizer.param_groups[0]["lr"]), time.perf_counter() - start
        records: list[dict | None] = []
        for i, member in enumerate(members):
            if member.stopped:
                records.append(None)
                continue
            record = {"epoch": epoch,
                      **({"member": i, "beta": member.config.beta, "seed": member.config.seed}
                         if k > 1 else {}),
                      **epoch_record(train[i], test[i], beta=member.config.beta, lr=lr,
                                     seconds=seconds)}
            member.history.append(record)
            records.append(record)
        progress(epoch, [m for m in records if m is not None])
        if on_epoch is not None:
            on_epoch(epoch, records)


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
