"""Time per training step of every method of the paper's Table 2, relative to `vae`, in one run.

    python -m benchmarks.method_steps [--arch conv|mlp] [--batch-size 100] [--repeats 5]
                                      [--steps 3] [--threads N] [--device cpu|cuda] [--quick]

One step = forward + backward + Adam update at beta = 1, with each method's paper settings
(4 mean-only flow steps of 3 x 640 units, 250 pseudo-inputs, MMD weight 999), 32 latents. The
batch is random binary images: step time does not depend on pixel values. Methods are timed
round-robin in each repetition (the order rotates), so that a slow spell of a shared machine hits
all of them alike; each figure is the median over repetitions of the mean of `steps` steps.
Prints a table, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch

from echo import METHODS, build_model
from echo.settings import TrainConfig



def registered_methods() -> tuple[str, ...]:
    """Every registered method (echo.methods: a new one is timed without an edit here), the
    reference `vae` first."""
    return ("vae", *sorted(m for m in METHODS if m != "vae"))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(methods, arch: str, batch_size: int, repeats: int, steps: int,
            device: torch.device, seed: int = 0) -> dict[str, dict]:
    torch.manual_seed(seed)
    x = torch.bernoulli(torch.full((batch_size, 1, 28, 28), 0.13)).to(device)
    runs = {}
    for method in methods:
        # the options a method takes from the run (Echo: the batch size) come from its settings
        model = build_model(method, arch=arch,
                            training=TrainConfig(method=method, batch_size=batch_size)).to(device)
        runs[method] = (model, torch.optim.Adam(model.parameters(), lr=3e-4))

    def step(method: str) -> None:
        model, optimizer = runs[method]
        out = model(x, 1.0)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()

    for method in methods:                       # warm-up: allocation, kernel selection
        for _ in range(2):
            step(method)
    _sync(device)
    times: dict[str, list[float]] = {m: [] for m in methods}
    for r in range(repeats):
        order = list(methods[r % len(methods):]) + list(methods[:r % len(methods)])
        for method in order:
            start = time.perf_counter()
            for _ in range(steps):
                step(method)
            _sync(device)
            times[method].append((time.perf_counter() - start) / steps)
    base = statistics.median(times["vae"]) if "vae" in times else None
    result = {}
    for method in methods:
        median = statistics.median(times[method])
        result[method] = {
            "ms_per_step": 1000 * median,
            "relative_to_vae": median / base if base else None,
            "parameters": sum(p.numel() for p in runs[method][0].parameters()),
        }
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.method_steps", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=("conv", "mlp"), default="conv")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--methods", default=",".join(registered_methods()))
    p.add_argument("--quick", action="store_true", help="mlp, 3 repeats of 2 steps")
    args = p.parse_args(argv)
    if args.quick:
        args.arch, args.repeats, args.steps = "mlp", 3, 2
    methods = tuple(m for m in args.methods.split(",") if m)
    if "vae" not in methods:
        print("error: --methods must include vae (the reference)", file=sys.stderr)
        return 2
    if args.batch_size < 2 or args.repeats < 1 or args.steps < 1:
        print("error: --batch-size >= 2, --repeats >= 1 and --steps >= 1", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    result = measure(methods, args.arch, args.batch_size, args.repeats, args.steps, device)
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"training step, arch={args.arch}, batch={args.batch_size}, device={device} ({where}); "
          f"median of {args.repeats} x {args.steps} steps")
    print(f"{'method':<10} {'ms/step':>9} {'x vae':>7} {'params (M)':>11}")
    for method, r in result.items():
        print(f"{method:<10} {r['ms_per_step']:>9.1f} {r['relative_to_vae']:>7.2f} "
              f"{r['parameters'] / 1e6:>11.2f}")
    print(json.dumps({"benchmark": "method_steps", "arch": args.arch, "batch_size": args.batch_size,
                      "device": str(device), "device_name": where, "repeats": args.repeats,
                      "steps": args.steps, "methods": result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
