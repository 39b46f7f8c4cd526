"""The speed benchmarks of issue 7, measured in one run on one device.

    python -m benchmarks [--quick] [--device cpu|cuda] [--only echo_vs_vae_step,...] [--compile]
                         [--no-cuda-graph]

Prints a table and then one JSON line whose keys are the figures below; every figure carries the
device it ran on. Timings are medians of repetitions that interleave the things compared, so
that a slow spell of a shared machine hits both sides of a ratio alike.

- echo_vs_vae_step: one training step (forward + backward + Adam) of `echo` over `vae`, paper
  architecture (conv), batch 100, 32 latents. The paper: "about the same wall-clock time".
- epoch_overhead: one epoch through `echo.train.fit` over the pure forward + backward + Adam
  time of the same steps on pre-sliced batches (data handling, metrics, logging; and the
  per-epoch test evaluation, reported both with and without it).
- images_per_s: training throughput of every registered method, conv, batch 100.
- sweep_overhead: a sweep's wall time x slots over its trials' summed training time at full
  packing (`benchmarks.sweep_overhead`, issue 5: Ray local, MLflow, digits, mlp, on the CPU
  whatever --device says); reported as missing when that module is absent.
- ensemble_speedup: K = 8 betas trained as one ensemble (`echo.ensemble`) over 8 separate
  models, in training images per second; both strategies (vmap, loop), the headline being the
  one `strategy="auto"` picks on the device.
- echo_noise_memory: peak bytes the Echo noise allocates in one forward + backward, against the
  B x d_max x D floats of its largest tensor.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from echo import METHODS, build_model

REPO = Path(__file__).resolve().parents[1]
FIGURES = ("echo_vs_vae_step", "epoch_overhead", "images_per_s", "sweep_overhead",
           "ensemble_speedup", "echo_noise_memory")
BATCH, LATENT, ENSEMBLE_K = 100, 32, 8
# "streams" is "loop" on a CPU: timed on CUDA only.
STRATEGIES_TIMED = {"cuda": ("vmap", "loop", "streams"), "cpu": ("vmap", "loop")}


@dataclass(frozen=True)
class Options:
    """How the models run: `torch.compile` and/or whole-step CUDA graphs (CUDA only); bfloat16
    autocast only for the tuning table (`benchmarks.gpu_variants`), never in training."""
    compile: bool = False
    cuda_graph: bool = True
    autocast: bool = False


# --------------------------------------------------------------------------- device and timing

def resolve_device(name: str) -> torch.device:
    """echo.device's rule for "auto"; a device this machine lacks is one line and exit 2."""
    from echo.device import device_problem, resolve_device as resolve
    problem = device_problem(name)
    if problem:
        raise SystemExit(f"error: --device {name}: {problem}; use --device cpu")
    return resolve(name)


def describe_device(device: torch.device) -> str:
    """A device name for the report, e.g. 'cuda: NVIDIA H100 80GB HBM3' or 'cpu: ... (2 threads)'."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {model} ({torch.get_num_threads()} threads)"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(steps: dict[str, Callable[[], object]], device: torch.device, *,
                        reps: int, warmup: int = 2, inner: int | None = None) -> dict[str, float]:
    """Median seconds of each callable, timed in rotating order within every repetition.
    A repetition runs each callable `inner` times (default: 20 on CUDA, where one
    millisecond-long step is too short to time alone, else 1) before synchronising."""
    inner = inner or (20 if device.type == "cuda" else 1)
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            for _ in range(inner):
                steps[name]()
            synchronize(device)
            times[name].append((time.perf_counter() - start) / inner)
    return {name: statistics.median(t) for name, t in times.items()}


# --------------------------------------------------------------------------- data

def benchmark_images(n: int, device: torch.device) -> tuple[torch.Tensor, str]:
    """n binary 28x28 images: the first n of binary MNIST when its IDX files are found, else
    Bernoulli(0.13) noise of the same shape (speed does not depend on the pixel values)."""
    x, source = _cpu_images(n)
    return x.to(device), source


@functools.lru_cache(maxsize=4)
def _cpu_images(n: int) -> tuple[torch.Tensor, str]:
    from echo.data import load_dataset
    for root in (os.environ.get("ECHO_MNIST_DIR"), os.environ.get("ECHO_DATA_ROOT"),
                 REPO.parent / "shared" / "data" / "mnist", REPO / "data" / "raw"):
        if root and any((Path(root) / f"train-images-idx3-ubyte{ext}").exists()
                        for ext in ("", ".gz")):
            x = load_dataset("binary_mnist", "train", root)[0][:n]
            if len(x) == n:
                return x, "binary_mnist"
    generator = torch.Generator().manual_seed(0)
    return (torch.rand(n, 1, 28, 28, generator=generator) < 0.13).float(), "synthetic"


def make_stepper(model: torch.nn.Module, x: torch.Tensor, beta: float = 1.0,
                 opts: Options = Options()) -> Callable[[], object]:
    """One training step: forward, backward, Adam (the paper's optimiser and learning rate),
    replayed as a CUDA graph with `opts.cuda_graph` and compiled with `opts.compile`, as
    `echo.train.fit` does."""
    return make_batch_stepper(model, beta, opts, x.device)(x)


def make_batch_stepper(model: torch.nn.Module, beta, opts: Options, device: torch.device):
    """stepper(x) -> a callable doing one training step on x; all share one model and Adam.
    beta None: `model` is an `Ensemble` (its betas inside; it compiles itself)."""
    from echo.graphs import GraphedStep, graph_ready_adam
    from echo.train import compile_model
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)
    graphs = opts.cuda_graph and device.type == "cuda"
    if graphs:
        graph_ready_adam(optimizer, device)
    forward = compile_model(model, device) if opts.compile and beta is not None else model

    def train_step(xb: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=opts.autocast):
            out = forward(xb) if beta is None else forward(xb, beta)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        return out.loss.detach()
    step = GraphedStep(train_step, enabled=graphs)
    return lambda xb: (lambda: step(xb))


def build(method: str, device: torch.device, arch: str = "conv", input_shape=(1, 28, 28),
          opts: "Options | None" = None):
    from echo.train import place_model
    torch.manual_seed(0)
    return place_model(build_model(method, arch=arch, latent_dim=LATENT,
                                   input_shape=input_shape), device,   # as fit places it
                       channels_last=not (opts and opts.compile))


# --------------------------------------------------------------------------- figures

def bench_echo_vs_vae_step(device: torch.device, quick: bool, opts: Options) -> dict:
    x, source = benchmark_images(BATCH, device)
    steps = {m: make_stepper(build(m, device, opts=opts), x, opts=opts) for m in ("echo", "vae")}
    reps = 6 if quick else 30
    med = interleaved_medians(steps, device, reps=reps, warmup=5)
    return {"ratio": med["echo"] / med["vae"], "echo_step_ms": 1e3 * med["echo"],
            "vae_step_ms": 1e3 * med["vae"], "batch": BATCH, "latent_dim": LATENT,
            "arch": "conv", "data": source, "target": 1.05 if device.type == "cuda" else 1.10}


def bench_images_per_s(device: torch.device, quick: bool, opts: Options) -> dict:
    x, source = benchmark_images(BATCH, device)
    steps, errors = {}, {}
    for method in sorted(METHODS):
        try:
            steps[method] = make_stepper(build(method, device, opts=opts), x, opts=opts)
            steps[method]()
        except Exception as err:  # a method that cannot build or step is reported, not fatal
            errors[method] = f"{type(err).__name__}: {err}".splitlines()[0][:200]
            steps.pop(method, None)
    med = interleaved_medians(steps, device, reps=3 if quick else 10,
                              warmup=5 if device.type == "cuda" else 1)
    result = {m: BATCH / t for m, t in med.items()}
    return {"per_method": result, "batch": BATCH, "arch": "conv", "data": source,
            **({"errors": errors} if errors else {})}


def bench_epoch_overhead(device: torch.device, quick: bool, opts: Options) -> dict:
    """fit's epoch wall time over the pure step time of the same number of steps.

    One `fit` run; after each of its epochs (`on_epoch`) a pure epoch runs: the same model
    architecture and optimiser (and the same `opts`), forward + backward + Adam over pre-sliced
    batches, nothing else; then the test evaluation alone is timed. Fit and pure epochs thus
    alternate closely, so that a shared machine's load swings hit both; the figure is the
    median over epochs (the first, warm-up epoch left out) of fit epoch / pure epoch. The test
    split is a fifth of the training split, as in binary MNIST (50k / 10k), so the evaluation
    share is that of a real epoch; the figure is given with and without it. On CUDA the epoch
    is binary MNIST's full 50k / 10k, and `fit_images_per_s` is the training throughput of
    `fit` itself, test evaluation included (issue 7's 40,000 images/s target).
    """
    from echo.train import TrainConfig, evaluate, evaluation_step, fit
    from echo.graphs import GraphedStep
    if device.type == "cuda":
        n_train = 10000 if quick else 50000
    else:
        n_train = 1000 if quick else 3000
    n_test = n_train // 5
    epochs = 3 if quick else 5
    x, source = benchmark_images(n_train + n_test, torch.device("cpu"))
    x_train, x_test = x[:n_train].to(device), x[n_train:].to(device)
    model = build("echo", device, opts=opts)
    stepper = make_batch_stepper(model, 1.0, opts, device)
    pure_steps = [stepper(x_train[i:i + BATCH].contiguous()) for i in range(0, n_train, BATCH)]
    eval_step = GraphedStep(evaluation_step(model, 1.0), enabled=opts.cuda_graph)
    pure, evaluation, fit_epochs = [], [], []

    def pure_epoch(epoch: int, metrics: dict, state) -> None:
        fit_epochs.append(metrics["epoch_seconds"])
        synchronize(device)
        start = time.perf_counter()
        for step in pure_steps:
            step()
        synchronize(device)
        middle = time.perf_counter()
        evaluate(model, x_test, BATCH, 1.0, step=eval_step)
        synchronize(device)
        pure.append(middle - start)
        evaluation.append(time.perf_counter() - middle)

    with tempfile.TemporaryDirectory() as tmp:
        npz = Path(tmp) / "bench.npz"
        y = np.zeros(len(x), dtype=np.int64)
        np.savez(npz, train_x=x[:n_train].numpy(), train_y=y[:n_train],
                 test_x=x[n_train:].numpy(), test_y=y[n_train:])
        config = TrainConfig(method="echo", dataset="binary_mnist", prepared=str(npz), arch="conv",
                             epochs=epochs, batch_size=BATCH, device=str(device), progress=False,
                             compile=opts.compile, cuda_graph=opts.cuda_graph)
        fit(config, on_epoch=pure_epoch)
    pairs = list(zip(fit_epochs, pure, evaluation))[1:]
    epoch_s = statistics.median(f for f, _, _ in pairs)
    return {"ratio": statistics.median(f / p for f, p, _ in pairs),
            "ratio_without_eval": statistics.median((f - e) / p for f, p, e in pairs),
            "epoch_s": epoch_s, "fit_images_per_s": n_train / epoch_s,
            "eval_s": statistics.median(e for _, _, e in pairs),
            "pure_steps_s": statistics.median(p for _, p, _ in pairs),
            "epochs_timed": len(pairs), "steps": len(pure_steps), "train_examples": n_train,
            "test_examples": n_test, "method": "echo", "arch": "conv", "data": source,
            "target": 1.10}


def bench_sweep_overhead(device: torch.device, quick: bool, opts: Options) -> dict:
    try:
        from benchmarks.sweep_overhead import measure_sweep_overhead
    except ImportError as err:
        return {"missing": f"benchmarks.sweep_overhead not available ({err}); issue 5"}
    result = dict(measure_sweep_overhead(quick))
    # Quick trials (10 epochs) are start-up dominated: the target is for the full run only.
    result.setdefault("target", None if quick else 1.15)
    return result


def bench_ensemble_speedup(device: torch.device, quick: bool, opts: Options) -> dict:
    """Images/s of K members as one ensemble over K separate models (K x one step), for both
    ensemble strategies; the headline is the strategy `auto` picks on this device."""
    from echo.ensemble import Ensemble, default_strategy
    betas = [0.25 * (i + 1) for i in range(ENSEMBLE_K)]
    shape = (1, 28, 28)
    x, source = benchmark_images(BATCH * ENSEMBLE_K, device)
    xs = x.view(ENSEMBLE_K, BATCH, *shape)
    result = {"k": ENSEMBLE_K, "betas": betas, "batch": BATCH, "data": source,
              "auto_strategy": default_strategy(device)}
    for arch in ("conv", "mlp"):
        steps = {"single": make_stepper(build("echo", device, arch=arch, opts=opts), x[:BATCH],
                                        opts=opts)}
        if opts.compile or opts.cuda_graph:
            # Separate runs as plain fit runs them (eager): what a naive sweep does.
            steps["single_eager"] = make_stepper(build("echo", device, arch=arch), x[:BATCH],
                                                 opts=Options(cuda_graph=False))
        for strategy in STRATEGIES_TIMED[device.type]:
            ensemble = Ensemble.build("echo", betas, arch=arch, latent_dim=LATENT,
                                      input_shape=shape, seeds=list(range(ENSEMBLE_K)),
                                      device=device, strategy=strategy, compile=opts.compile)
            steps[strategy] = make_batch_stepper(ensemble, None, opts, device)(xs)
        reps = (2 if quick else 6) if arch == "conv" else (5 if quick else 20)
        med = interleaved_medians(steps, device, reps=reps, warmup=1)
        separate = BATCH / med["single"]          # K separate runs, one after the other
        result[arch] = {"separate_images_per_s": separate, **{
            f"{strategy}_images_per_s": ENSEMBLE_K * BATCH / med[strategy]
            for strategy in STRATEGIES_TIMED[device.type]}, **{
            f"{strategy}_speedup": ENSEMBLE_K * BATCH / med[strategy] / separate
            for strategy in STRATEGIES_TIMED[device.type]}}
        if "single_eager" in med:
            eager = BATCH / med["single_eager"]
            result[arch]["separate_eager_images_per_s"] = eager
            result[arch].update({f"{strategy}_speedup_over_eager_runs":
                                 ENSEMBLE_K * BATCH / med[strategy] / eager
                                 for strategy in STRATEGIES_TIMED[device.type]})
    auto = result["auto_strategy"]
    result["speedup"] = result["conv"][f"{auto}_speedup"]
    result["target"] = 4.0 if device.type == "cuda" else None
    return result


class AllocationTracker(TorchDispatchMode):
    """Peak bytes of the tensors that operators allocate while the mode is active.

    Each operator output whose storage is new is counted until its last Python reference dies;
    this sees every tensor the autograd graph saves as well as the temporaries, on any device.
    """

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = self.peak = 0

    def _release(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live and storage.nbytes() > 0:
                    self.live[key] = storage.nbytes()
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(t, self._release, key)
        return out


def bench_echo_noise_memory(device: torch.device, quick: bool, opts: Options) -> dict:
    from echo.noise import echo_sample
    batch, d_max, dim = BATCH, BATCH - 1, LATENT
    torch.manual_seed(0)
    f = torch.randn(batch, dim, device=device).tanh().requires_grad_()
    log_s = (torch.randn(batch, dim, device=device) - 2).clamp(max=-0.1).requires_grad_()
    reference = batch * d_max * dim * f.element_size()
    tracker = AllocationTracker()
    with tracker:
        z = echo_sample(f, log_s, check=False)
        z.sum().backward()
    del z
    result = {"peak_bytes": tracker.peak, "b_dmax_d_bytes": reference,
              "peak_over_b_dmax_d": tracker.peak / reference, "batch": batch, "d_max": d_max,
              "latent_dim": dim}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        z = echo_sample(f, log_s, check=False)
        z.sum().backward()
        torch.cuda.synchronize(device)
        result["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(device) - base
    return result


BENCHMARKS: dict[str, Callable[[torch.device, bool, Options], dict]] = {
    "echo_vs_vae_step": bench_echo_vs_vae_step,
    "epoch_overhead": bench_epoch_overhead,
    "images_per_s": bench_images_per_s,
    "sweep_overhead": bench_sweep_overhead,
    "ensemble_speedup": bench_ensemble_speedup,
    "echo_noise_memory": bench_echo_noise_memory,
}


# --------------------------------------------------------------------------- report

def headline(name: str, result: dict) -> str:
    """The one number of a figure, with its target, for the table."""
    if "missing" in result:
        return f"missing: {result['missing']}"
    if "error" in result:
        return f"error: {result['error']}"
    if name == "echo_vs_vae_step":
        return (f"{result['ratio']:.3f} (echo {result['echo_step_ms']:.1f} ms, vae "
                f"{result['vae_step_ms']:.1f} ms; target <= {result['target']})")
    if name == "epoch_overhead":
        return (f"{result['ratio']:.3f} with test eval, {result['ratio_without_eval']:.3f} without "
                f"({result['steps']} steps; target <= {result['target']})")
    if name == "images_per_s":
        return ", ".join(f"{m} {v:,.0f}" for m, v in result["per_method"].items())
    if name == "ensemble_speedup":
        parts = "; ".join(f"{arch} " + ", ".join(
            f"{k[:-len('_speedup')]} {v:.2f}x" for k, v in result[arch].items()
            if k.endswith("_speedup")) for arch in ("conv", "mlp"))
        if "separate_eager_images_per_s" in result["conv"]:
            auto = result["auto_strategy"]
            parts += (f"; conv {auto} over separate eager runs "
                      f"{result['conv'][f'{auto}_speedup_over_eager_runs']:.2f}x")
        return (f"{result['speedup']:.2f}x conv with the {result['auto_strategy']} strategy "
                f"(K={result['k']}; {parts})")
    if name == "echo_noise_memory":
        return (f"{result['peak_bytes'] / 2**20:.2f} MiB = {result['peak_over_b_dmax_d']:.1f} x "
                f"B*d_max*D floats")
    if name == "sweep_overhead" and "overhead" in result:
        return (f"{result['overhead']:.3f} ({result.get('trials')} trials on "
                f"{result.get('slots')} slots; target <= {result.get('target')})")
    return json.dumps(result)[:120]


def run(names: list[str], device: torch.device, quick: bool, opts: Options = Options(),
        log=lambda s: print(s, file=sys.stderr, flush=True)) -> dict:
    label = describe_device(device)
    results: dict[str, dict] = {}
    for name in names:
        log(f"[benchmarks] {name} on {label} ...")
        start = time.perf_counter()
        try:
            result = BENCHMARKS[name](device, quick, opts)
        except Exception as err:  # one broken figure must not hide the others
            result = {"error": f"{type(err).__name__}: {err}".splitlines()[0][:300]}
        result.setdefault("device", label)     # the sweep benchmark names its own (CPU) device
        result["seconds"] = round(time.perf_counter() - start, 1)
        results[name] = result
    return results


def _round(obj):
    if isinstance(obj, float):
        return obj if not math.isfinite(obj) else float(f"{obj:.4g}")
    if isinstance(obj, dict):
        return {k: _round(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_round(v) for v in obj]
    return obj


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI-sized settings (fewer repetitions)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--only", default=",".join(FIGURES),
                   help=f"comma-separated subset of {','.join(FIGURES)}")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the models (falls back to eager where it cannot)")
    p.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false",
                   help="replay each training step as one CUDA graph (CUDA only; as fit does)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(names) - set(FIGURES))
    if unknown:
        p.error(f"--only: unknown figure(s) {unknown}; choose from {list(FIGURES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    from echo.train import tune_backends
    device = resolve_device(args.device)
    tune_backends(device)        # the backend settings fit uses (cudnn.benchmark on CUDA)
    opts = Options(compile=args.compile, cuda_graph=args.cuda_graph)
    results = _round(run(names, device, args.quick, opts))
    width = max(len(n) for n in names)
    print(f"{'figure':<{width}}  result  [device]")
    for name, result in results.items():
        print(f"{name:<{width}}  {headline(name, result)}  [{result['device']}]")
    print(json.dumps({"quick": args.quick, "compile": args.compile,
                      "cuda_graph": args.cuda_graph,
                      "cudnn_benchmark": torch.backends.cudnn.benchmark, **results}))
    return 0
