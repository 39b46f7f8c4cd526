"""GPU tuning table: the conv training step under every backend setting worth trying.

    python -m benchmarks.gpu_variants

For `echo` and `vae` (conv, batch 100, 32 latents), every step replayed as a CUDA graph (as
`fit(cuda_graph=True)` does), it times one training step for each combination of
  - memory format NCHW / channels_last (NHWC: the layout of cuDNN's tensor-core kernels),
  - for echo: the Echo noise in 1, 2 or 4 pieces (`echo_noise`; fewer pieces, fewer kernels,
    more memory) and the one-shot autograd version (`echo_noise_reference`, ~5 x the memory),
and the 8-member ensembles (vmap, streams) against 8 separate graphed runs. The first version
of this script also crossed cudnn.benchmark and bfloat16 autocast (its figures are in
docs/performance.md; `time_variants(benchmark_modes=..., precisions=...)` still can). Prints
a table and a JSON line; images/s = 100 / step.
It is a tuning aid: the settings it finds best become defaults only with a test behind them.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch

from benchmarks.run import (BATCH, ENSEMBLE_K, LATENT, Options, benchmark_images,
                            describe_device, interleaved_medians, make_batch_stepper)


def graphed_stepper(model, x, beta, autocast: bool):
    """One graphed training step on x, as `benchmarks.run` times it (beta None: an ensemble)."""
    return make_batch_stepper(model, beta, Options(autocast=autocast), x.device)(x)


def build(method, fmt, device):
    from echo import build_model
    torch.manual_seed(0)
    model = build_model(method, arch="conv", latent_dim=LATENT, input_shape=(1, 28, 28))
    return model.to(device=device, memory_format=fmt)


def time_variants(device, reps: int, benchmark_modes=(False,), precisions=(False,),
                  pieces=(1, 2, 4)) -> list[dict]:
    import echo.noise as noise
    chunked, default_pieces = noise.echo_noise, noise.ECHO_CHUNKS
    reference = getattr(noise, "echo_noise_reference", None)
    x, _ = benchmark_images(BATCH, device)
    rows = []
    impls = [("vae", None)] + [("echo", f"pieces{p}") for p in pieces] + \
        ([("echo", "reference")] if reference is not None else [])
    for bench, fmt_name in itertools.product(benchmark_modes, ("nchw", "channels_last")):
        torch.backends.cudnn.benchmark = bench
        fmt = torch.channels_last if fmt_name == "channels_last" else torch.contiguous_format
        xf = x.contiguous(memory_format=fmt)
        steps, labels = {}, {}
        for autocast in precisions:
            for method, impl in impls:
                noise.echo_noise = reference if impl == "reference" else chunked
                if impl and impl.startswith("pieces"):
                    noise.ECHO_CHUNKS = int(impl[len("pieces"):])
                name = f"{method}/{impl or '-'}/{'bf16' if autocast else 'fp32'}"
                try:
                    steps[name] = graphed_stepper(build(method, fmt, device), xf, 1.0, autocast)
                    for _ in range(4):   # warm-up and capture under this noise implementation
                        steps[name]()
                    labels[name] = dict(method=method, noise=impl, precision="bf16" if autocast
                                        else "fp32")
                except Exception as err:  # noqa: BLE001 - a variant that fails is reported
                    rows.append({"cudnn_benchmark": bench, "format": fmt_name, "variant": name,
                                 "error": f"{type(err).__name__}: {err}".splitlines()[0][:200]})
                    steps.pop(name, None)
                finally:
                    noise.echo_noise, noise.ECHO_CHUNKS = chunked, default_pieces
        med = interleaved_medians(steps, device, reps=reps, warmup=2)
        for name, seconds in med.items():
            rows.append({"cudnn_benchmark": bench, "format": fmt_name, "variant": name,
                         **labels[name], "step_ms": 1e3 * seconds, "images_per_s": BATCH / seconds})
    torch.backends.cudnn.benchmark = False
    return rows


def time_ensembles(device, reps: int) -> list[dict]:
    """8 graphed separate runs against one graphed vmap ensemble (NCHW: vmap stacks the conv
    weights into 5-D tensors, which have no channels_last layout)."""
    from echo.ensemble import Ensemble
    x, _ = benchmark_images(BATCH * ENSEMBLE_K, device)
    betas = [0.25 * (i + 1) for i in range(ENSEMBLE_K)]
    rows = []
    for bench in (False,):
        torch.backends.cudnn.benchmark = bench
        try:
            single = graphed_stepper(build("echo", torch.contiguous_format, device), x[:BATCH],
                                     1.0, False)
            steps = {"single": single}
            for strategy in ("vmap", "streams"):
                ensemble = Ensemble.build("echo", betas, arch="conv", latent_dim=LATENT,
                                          input_shape=(1, 28, 28), seeds=list(range(ENSEMBLE_K)),
                                          device=device, strategy=strategy)
                steps[strategy] = graphed_stepper(ensemble, x.view(ENSEMBLE_K, BATCH, 1, 28, 28),
                                                  None, False)
            med = interleaved_medians(steps, device, reps=reps, warmup=5)
            separate = BATCH / med["single"]
            for strategy in ("vmap", "streams"):
                together = ENSEMBLE_K * BATCH / med[strategy]
                rows.append({"cudnn_benchmark": bench, "format": "nchw", "strategy": strategy,
                             "separate_images_per_s": separate,
                             "ensemble_images_per_s": together, "speedup": together / separate})
        except Exception as err:  # noqa: BLE001
            rows.append({"cudnn_benchmark": bench, "format": "nchw",
                         "error": f"{type(err).__name__}: {err}".splitlines()[0][:200]})
    torch.backends.cudnn.benchmark = False
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_variants",
                                description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--device", default="cuda", help="cuda; cpu only smoke-tests the script")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: needs a CUDA device", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    result = {"device": describe_device(device), "torch": torch.__version__}
    # Printed as each part finishes, so that a time limit still leaves the parts done.
    result["variants"] = time_variants(device, args.reps)
    for row in result["variants"]:
        print(f"{'bench' if row['cudnn_benchmark'] else 'nobench':7} {row['format']:13} "
              f"{row['variant']:24} " + (f"{row['step_ms']:6.2f} ms {row['images_per_s']:9,.0f} img/s"
                                         if "step_ms" in row else row["error"]), flush=True)
    result["ensembles"] = time_ensembles(device, max(3, args.reps // 2))
    for row in result["ensembles"]:
        print(f"ensemble K={ENSEMBLE_K} {'bench' if row['cudnn_benchmark'] else 'nobench':7} "
              f"{row.get('strategy', ''):8} " + (f"{row['speedup']:.2f}x ({row['ensemble_images_per_s']:,.0f}"
                                        f" vs {row['separate_images_per_s']:,.0f} img/s)"
                                        if "speedup" in row else row["error"]), flush=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
