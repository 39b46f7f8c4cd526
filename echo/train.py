"""One readable training loop for every method (the paper's recipe by default).

    python -m echo.train --method echo --dataset binary_mnist --beta 1.0 --epochs 200 --out runs/x

Adam 3e-4, batch 100, learning rate constant for the first half of training and then linearly
decayed to 0 (App. B). Data sets live on the device and are batched by indexing. Each epoch
reports train and test rate, distortion and -ELBO (= rate + distortion, whatever beta) in nats.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from .data import load_dataset, load_prepared
from .graphs import GraphCaptureError, GraphedStep, graph_ready_adam, portable_optimizer_state
from .methods import Autoencoder, build_model
from .noise import check_echo_truncation

METRIC_NAMES = ("rate", "distortion", "neg_elbo")
# Why a warm-up of beta at all, and why this length: docs/methods.md, "Why the conv models did
# not learn". 500 steps: one of the paper's 200 epochs (the first 0.5% of its training).
BETA_WARMUP_STEPS = 500
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run cannot continue."""


@dataclass
class TrainConfig:
    method: str = "echo"
    dataset: str = "binary_mnist"
    data_root: str | None = None        # None: $ECHO_DATA_ROOT or data/raw
    prepared: str | None = None         # a .npz written by stages/prepare (else raw files)
    arch: str = "conv"
    latent_dim: int = 32
    beta: float = 1.0
    epochs: int = 200
    batch_size: int = 100
    lr: float = 3e-4
    lr_decay_start: float = 0.5         # fraction of training after which lr decays linearly to 0
    beta_warmup_steps: int = BETA_WARMUP_STEPS  # beta rises linearly from 0 over these steps
    seed: int = 0
    device: str = "auto"
    train_limit: int | None = None      # use only the first N training examples (quick runs)
    test_limit: int | None = None
    method_options: dict = field(default_factory=dict)
    out: str | None = None              # directory for metrics.json and checkpoint.pt
    progress: bool = True
    compile: bool = False               # torch.compile the training step on CUDA (eager elsewhere)
    cuda_graph: bool = True             # replay each step as one CUDA graph (eager on CPU)

    def __post_init__(self):
        for name in ("epochs", "batch_size", "latent_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.batch_size < 2:
            raise ValueError("batch_size must be >= 2: Echo noise uses the other examples")
        if not (math.isfinite(self.beta) and self.beta >= 0):
            raise ValueError(f"beta must be a finite number >= 0, got {self.beta!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if (isinstance(self.beta_warmup_steps, bool) or not isinstance(self.beta_warmup_steps, int)
                or self.beta_warmup_steps < 0):
            raise ValueError(f"beta_warmup_steps must be an integer >= 0, got "
                             f"{self.beta_warmup_steps!r}")
        if not 0 <= self.lr_decay_start <= 1:
            raise ValueError(f"lr_decay_start must lie in [0, 1], got {self.lr_decay_start!r}")


@dataclass
class FitResult:
    model: Autoencoder
    history: list[dict]          # one dict of metrics per epoch
    metrics: dict                # the last epoch's metrics


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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


def load_train_test(config: TrainConfig) -> tuple[Tensor, Tensor]:
    """Training and test images, from a prepared .npz when given, else from the raw files."""
    if config.prepared is not None:
        return (load_prepared(config.prepared, "train")[0], load_prepared(config.prepared, "test")[0])
    return (load_dataset(config.dataset, "train", config.data_root)[0],
            load_dataset(config.dataset, "test", config.data_root)[0])


def device_data(config: TrainConfig, device: torch.device) -> tuple[Tensor, Tensor]:
    """The training and test images cut to the configured limits and moved to the device once,
    to be batched by indexing; refuses a batch larger than the training set."""
    x_train, x_test = load_train_test(config)
    x_train = x_train[: config.train_limit].to(device)
    x_test = x_test[: config.test_limit].to(device)
    if len(x_train) < config.batch_size:
        raise ValueError(f"batch_size={config.batch_size} exceeds the {len(x_train)} training "
                         f"examples of {config.dataset}")
    return x_train, x_test


def make_model(config: TrainConfig, input_shape: tuple[int, ...]) -> Autoencoder:
    options = dict(config.method_options)
    if config.method == "echo":
        options.setdefault("batch_size", config.batch_size)
    return build_model(config.method, arch=config.arch, latent_dim=config.latent_dim,
                       input_shape=input_shape, **options)


def tune_backends(device: torch.device) -> None:
    """On CUDA, let cuDNN time its convolution algorithms once per shape and keep the fastest
    (the shapes of a run are fixed): ~10% faster conv steps, ~1.5x for the grouped convolutions
    of a vmap ensemble (H200, docs/performance.md). A process-wide setting, as in nanoGPT."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def place_model(model: Autoencoder, device: torch.device, *,
                channels_last: bool = True) -> Autoencoder:
    """The model on `device`; on CUDA its convolution weights in channels_last (NHWC), the
    layout of cuDNN's tensor-core kernels: ~10% faster training steps of the paper's conv
    network on an H200 (docs/performance.md). Values and checkpoints are unchanged.
    `channels_last=False` for torch.compile: inductor (torch 2.11) failed a stride assertion
    on the channels_last conv model's backward."""
    model = model.to(device)
    if device.type == "cuda" and channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def batches(n: int, batch_size: int, *, shuffle: bool, generator=None, device=None):
    """Index tensors of each batch. Training drops a last batch smaller than half a batch
    (Echo noise needs other examples); evaluation folds a tiny remainder into the last batch."""
    order = torch.randperm(n, generator=generator, device=device) if shuffle else \
        torch.arange(n, device=device)
    chunks = list(order.split(batch_size))
    if len(chunks) > 1 and len(chunks[-1]) < 2:
        chunks[-2] = torch.cat([chunks[-2], chunks.pop()])
    return chunks


def compile_model(fn: Callable, device: str | torch.device, *, force: bool = False,
                  backend: str = "inductor") -> Callable:
    """`torch.compile(fn)` where it pays off, else `fn` itself.

    On CUDA the small models of a sweep are launch-bound and compiling fuses their kernels; on
    the CPU the compile time is not paid back at these sizes, so `fn` runs eagerly unless
    `force`. A compilation that fails (at torch.compile or at any later call, e.g. a recompile
    for a new batch size) warns once and falls back to eager for good; a genuine error in `fn`
    then re-raises from the eager call.
    """
    if torch.device(device).type != "cuda" and not force:
        return fn
    try:
        compiled = torch.compile(fn, backend=backend)
    except Exception as err:  # torch raises several types (invalid backend, no compiler)
        warnings.warn(f"torch.compile unavailable ({type(err).__name__}: {err}); running eagerly",
                      RuntimeWarning, stacklevel=2)
        return fn
    return _EagerFallback(compiled, fn)


class _EagerFallback:
    """Calls the compiled function until it first fails, then the eager one."""

    def __init__(self, compiled: Callable, eager: Callable):
        self.compiled, self.eager, self.failed = compiled, eager, False

    def __call__(self, *args, **kwargs):
        if not self.failed:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as err:
                warnings.warn(f"torch.compile failed ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}); running eagerly",
                              RuntimeWarning, stacklevel=2)
                self.failed = True
        return self.eager(*args, **kwargs)


def metric_sums(out) -> Tensor:
    """[summed rate, summed distortion] of a batch, kept on the device until the epoch ends."""
    return torch.stack([out.rate.sum(), out.distortion.sum()]).detach()


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
    return _mean_metrics(sums, len(x))


IWAE_ROWS = 2000            # images decoded at once by the IWAE bound (bounds memory)


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


def _mean_metrics(sums: Tensor, count: int) -> dict:
    """rate, distortion and -ELBO = rate + distortion from summed rates and distortions.
    The sums are float64 and -ELBO is derived rather than summed a third time, so the
    numbers do not depend on float32 reduction order."""
    rate, distortion = (sums / count).tolist()
    return {"rate": rate, "distortion": distortion, "neg_elbo": rate + distortion}


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file so that a crash never leaves a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_checkpoint(path: str | Path, state: dict) -> None:
    atomic_write(Path(path), lambda p: torch.save(state, p))


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint safely (tensors and plain data only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for damaged files
        raise ValueError(f"checkpoint {path} cannot be loaded ({type(err).__name__}: "
                         f"{_load_error_reason(err)}); delete it to retrain from scratch") from err


def _load_error_reason(err: Exception) -> str:
    """One line: torch's weights-only refusal spans paragraphs (and suggests the unsafe
    weights_only=False); keep only the reason, e.g. "Unsupported global: GLOBAL builtins.open"."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].strip().split("\n\n")[0]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else "unreadable"


def load_model(path: str | Path, device: str = "cpu") -> tuple[Autoencoder, TrainConfig]:
    """Rebuild a trained model from a checkpoint written by `fit`."""
    state = load_checkpoint(path)
    config = TrainConfig(**{**state["config"], "progress": False})
    model = make_model(config, tuple(state["input_shape"]))
    model.load_state_dict(state["model"])
    return model.to(device), config


def fit(config: TrainConfig, *, on_epoch: Callable[[int, dict, Callable[[], dict]], None] | None = None,
        resume: dict | None = None) -> FitResult:
    """Train one model. `on_epoch(epoch, metrics, state)` is called after every epoch; `state()`
    builds a checkpoint dict that `fit(config, resume=...)` continues from."""
    device = resolve_device(config.device)
    tune_backends(device)
    torch.manual_seed(config.seed)
    x_train, x_test = device_data(config, device)
    input_shape = tuple(x_train.shape[1:])

    model = place_model(make_model(config, input_shape), device,
                        channels_last=not config.compile)
    step_model = compile_model(model, device) if config.compile else model
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    graphs = config.cuda_graph and device.type == "cuda"
    if graphs:
        graph_ready_adam(optimizer, device)
    steps_per_epoch = len(batches(len(x_train), config.batch_size, shuffle=False))
    total_steps = config.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, config.lr_decay_start))
    history: list[dict] = []
    first_epoch = 1
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        if graphs:
            graph_ready_adam(optimizer, device)
        scheduler.load_state_dict(resume["scheduler"])
        torch.set_rng_state(resume["rng"])
        history = list(resume["history"])
        first_epoch = int(resume["epoch"]) + 1

    def state() -> dict:
        # A snapshot: state_dict() tensors and `history` are live objects that later steps
        # would change under a caller who keeps the dict.
        snapshot = copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                  "scheduler": scheduler.state_dict(),
                                  "rng": torch.get_rng_state(), "epoch": len(history),
                                  "history": history, "config": asdict(config),
                                  "input_shape": list(input_shape)})
        portable_optimizer_state(snapshot["optimizer"])
        return snapshot

    # beta as a device tensor updated in place before each step, so that a captured CUDA graph
    # (which would freeze a Python float) follows the warm-up.
    beta_now = torch.zeros((), device=device)

    def train_step(x: Tensor) -> Tensor:
        out = step_model(x, beta_now)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        return metric_sums(out)

    step = GraphedStep(train_step, enabled=graphs)
    eval_step = GraphedStep(evaluation_step(model, config.beta), enabled=graphs)

    progress = _progress(config, first_epoch)
    for epoch in range(first_epoch, config.epochs + 1):
        start = time.perf_counter()
        sums = torch.zeros(2, dtype=torch.float64, device=device)
        seen = 0
        for idx in batches(len(x_train), config.batch_size, shuffle=True, device=device):
            beta = config.beta * beta_factor(scheduler.last_epoch, config.beta_warmup_steps)
            # A beta beyond float32's range is inf, as a float32 product would be: the loss
            # then turns non-finite and the run stops with that reason.
            beta_now.fill_(beta if beta < FLOAT32_MAX else math.inf)
            sums += step(x_train[idx])
            scheduler.step()
            seen += len(idx)
        train = _mean_metrics(sums, seen)
        if not all(math.isfinite(v) for v in train.values()):
            raise NonFiniteLossError(f"non-finite training loss at epoch {epoch} ({train})")
        test = evaluate(model, x_test, config.batch_size, config.beta, step=eval_step)
        metrics = {"epoch": epoch, "lr": float(optimizer.param_groups[0]["lr"]),
                   "epoch_seconds": time.perf_counter() - start,
                   **{f"train_{k}": v for k, v in train.items()},
                   **{f"test_{k}": v for k, v in test.items()}}
        history.append(metrics)
        progress(metrics)
        if on_epoch is not None:
            on_epoch(epoch, metrics, state)

    if config.out is not None:
        out = Path(config.out)
        out.mkdir(parents=True, exist_ok=True)
        save_checkpoint(out / "checkpoint.pt", state())
        atomic_write(out / "metrics.json",
                     lambda p: p.write_text(json.dumps(history[-1] if history else {}, indent=2)))
    return FitResult(model=model, history=history, metrics=history[-1] if history else {})


def _progress(config: TrainConfig, first_epoch: int) -> Callable[[dict], None]:
    """A tqdm bar over epochs when tqdm is installed and asked for; otherwise silent."""
    if not config.progress:
        return lambda metrics: None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return lambda m: print(f"epoch {m['epoch']}: test -ELBO {m['test_neg_elbo']:.2f}",
                               file=sys.stderr)
    bar = tqdm(total=config.epochs, initial=first_epoch - 1, desc=f"{config.method} β={config.beta}",
               unit="epoch")

    def update(m: dict) -> None:
        bar.set_postfix(rate=f"{m['test_rate']:.2f}", dist=f"{m['test_distortion']:.2f}",
                        neg_elbo=f"{m['test_neg_elbo']:.2f}")
        bar.update(1)
        if m["epoch"] == config.epochs:
            bar.close()
    return update


def device_problem(name: str) -> str | None:
    """Why the device `name` cannot be used on this machine, in a few words; None if it can."""
    if name == "auto":
        return None
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        return "not a device name (auto, cpu, cuda, cuda:<index>, mps)"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "this machine has no usable CUDA GPU (torch.cuda.is_available() is False)"
        if device.index is not None and device.index >= torch.cuda.device_count():
            return f"this machine has only {torch.cuda.device_count()} CUDA device(s)"
    elif device.type == "mps" and not torch.backends.mps.is_available():
        return "this machine has no usable MPS device"
    elif device.type not in ("cpu", "cuda", "mps"):
        return f"device type {device.type!r} is not supported (auto, cpu, cuda, mps)"
    return None


def _parse_option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--option expects key=value, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main(argv: list[str] | None = None) -> int:
    defaults = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m echo.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default=defaults.method)
    p.add_argument("--dataset", default=defaults.dataset)
    p.add_argument("--data-root", default=None)
    p.add_argument("--arch", default=defaults.arch)
    p.add_argument("--latent-dim", type=int, default=defaults.latent_dim)
    p.add_argument("--beta", type=float, default=defaults.beta)
    p.add_argument("--epochs", type=int, default=defaults.epochs)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--beta-warmup-steps", type=int, default=defaults.beta_warmup_steps,
                   help="beta rises linearly from 0 to --beta over this many steps (0: off)")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--device", default=defaults.device)
    p.add_argument("--train-limit", type=int, default=None)
    p.add_argument("--test-limit", type=int, default=None)
    p.add_argument("--option", type=_parse_option, action="append", default=[],
                   help="method option key=value, e.g. clip_factor=0.8 (repeatable)")
    p.add_argument("--out", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile on CUDA (eager on CPU)")
    p.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false",
                   help="on CUDA, launch every kernel from Python instead of replaying each "
                        "training step as one CUDA graph (needed for steps that sync the host)")
    args = p.parse_args(argv)
    # Checked before anything loads, one line each: the same rule as params.yaml's, and a
    # device this machine lacks (else a CUDA traceback after the data has loaded).
    problem = device_problem(args.device)
    if problem:
        print(f"error: --device {args.device}: {problem}; use --device auto or cpu",
              file=sys.stderr)
        return 2
    options = dict(args.option)
    try:
        if args.method == "echo":
            check_echo_truncation(args.batch_size, options.get("d_max"),
                                  bool(options.get("replace", False)), options.get("clip_factor"),
                                  names={"d_max": "--option d_max", "batch_size": "--batch-size",
                                         "clip_factor": "--option clip_factor"})
        config = TrainConfig(method=args.method, dataset=args.dataset, data_root=args.data_root,
                             arch=args.arch, latent_dim=args.latent_dim, beta=args.beta,
                             epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                             beta_warmup_steps=args.beta_warmup_steps,
                             seed=args.seed, device=args.device, train_limit=args.train_limit,
                             test_limit=args.test_limit, method_options=options,
                             cuda_graph=args.cuda_graph,
                             out=args.out, progress=not args.no_progress,
                             compile=args.compile)
        result = fit(config)
    except (ValueError, NonFiniteLossError, GraphCaptureError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result.metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
