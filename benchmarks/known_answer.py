"""Trained models against sources whose rate-distortion function is known (echo.known_answer).

    python -m benchmarks.known_answer [--out docs/results/known_answer] [--methods echo,vae,iaf-prior]
        [--seeds 0,1] [--epochs 10] [--sources binary_source,gaussian_source] [--threads 1]
        [--plot-only]

For each source (echo/data/sets/binary_source.py: 16 binary pixels, H(X) by enumeration;
gaussian_source.py: N(0, diag sigma^2) in 8 dimensions with a Gaussian decoder of std tau),
method, beta and seed: one `echo.train.fit` run (MLP, 8 latents, Adam 1e-3, batch 100, each
method's default options, so Echo's f is tanh, except iaf-prior's flow layers: 128 units), then its test point against the true curve
(`echo.known_answer.check_model`: rate, distortion, the curve's distortion at that rate, the
excess and its standard error over the 10,000 test examples, and whether it lies below the
curve by more than 3 errors). Each finished run is one JSON file under <out>/runs/, so an
interrupted run resumes where it stopped (finished runs are skipped). Writes
<out>/known_answer.csv (one row per source, method, beta, seed), <out>/<source>.spec.json,
<out>/known_answer.png and prints a summary per source and method.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

SOURCES = ("binary_source", "gaussian_source")
BETAS = {"binary_source": (0.25, 0.5, 1.0, 2.0, 4.0),
         "gaussian_source": (0.1, 0.3, 1.0, 3.0, 10.0)}
COLUMNS = ("source", "method", "beta", "seed", "rate", "rate_kind", "distortion",
           "curve_distortion", "excess", "excess_se", "below", "neg_elbo", "low_rate_limit",
           "likelihood", "options", "epochs", "train_seconds")
LATENT_DIM = 8
# iaf-prior with 128-unit flow layers instead of the paper's 640 (5x cheaper on these 8-d codes
# and 16-pixel images); every other method and option at its default (Echo: f = tanh).
METHOD_OPTIONS = {"iaf-prior": {"flow_hidden": 128}}


def method_and_options(label: str) -> tuple[str, dict]:
    """ "echo[f_range=8]" -> ("echo", {"f_range": 8}): a method with options beyond
    METHOD_OPTIONS, labelled apart in the table."""
    method, _, rest = label.partition("[")
    options = dict(METHOD_OPTIONS.get(method, {}))
    for item in filter(None, rest.rstrip("]").split(",")):
        key, _, value = item.partition("=")
        options[key] = json.loads(value)
    return method, options


def run_one(source: str, label: str, beta: float, seed: int, epochs: int) -> dict:
    import torch
    from echo import echo_low_rate_limit
    from echo.data import load_dataset
    from echo.known_answer import check_model, dataset_curve
    from echo.train import TrainConfig, fit

    method, options = method_and_options(label)
    config = TrainConfig(method=method, dataset=source, arch="mlp", latent_dim=LATENT_DIM,
                         beta=beta, epochs=epochs, batch_size=100, lr=1e-3,
                         beta_warmup_steps=200, seed=seed, device="cpu", progress=False,
                         cuda_graph=False, method_options=options)
    start = time.perf_counter()
    model = fit(config).model
    seconds = time.perf_counter() - start
    curve = dataset_curve(source, model.likelihood)
    x_test = load_dataset(source, "test")[0]
    torch.manual_seed(seed)
    point = check_model(model, x_test, curve, batch_size=config.batch_size, beta=beta)
    clip = getattr(model.channel, "clip_factor", None)
    return {"source": source, "method": label, "beta": beta, "seed": seed, **point,
            "below": point["below"], "rate_kind": model.rate_kind,
            "neg_elbo": point["rate"] + point["distortion"],
            "low_rate_limit": echo_low_rate_limit(clip, LATENT_DIM) if clip else None,
            "likelihood": json.dumps(model.likelihood.describe()),
            "options": json.dumps(config.method_options), "epochs": epochs,
            "train_seconds": round(seconds, 1)}


def write_specs(out: Path, sources) -> None:
    from echo.data import dataset_spec
    for source in sources:
        spec = dataset_spec(source)
        (out / f"{source}.spec.json").write_text(json.dumps(
            {"dataset": source, "likelihood": spec.likelihood, "tau": spec.tau,
             **spec.known_answer()}, indent=2) + "\n")


def plot(table, out: Path, sources) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from echo.data import dataset_spec
    from echo.known_answer import dataset_curve
    from echo.networks import make_likelihood

    fig, axes = plt.subplots(2, len(sources), figsize=(6 * len(sources), 8), squeeze=False,
                             gridspec_kw={"height_ratios": (3, 2)})
    for ax, low, source in zip(axes[0], axes[1], sources):
        spec = dataset_spec(source)
        curve = dataset_curve(source, make_likelihood(spec.likelihood, spec.tau))
        rows = table[table["source"] == source]
        top = max(float(rows["rate"].max()) * 1.1 if len(rows) else 1.0,
                  curve.entropy * 1.05 if curve.entropy else 0.0)
        grid = np.linspace(0, top, 400)
        ax.plot(grid, curve.distortion_at(grid), "k-", linewidth=2, label="true D(R)", zorder=5)
        for method, group in rows.groupby("method", sort=False):
            means = group.groupby("beta")[["rate", "distortion"]].agg(["mean", "sem"])
            kind = group["rate_kind"].iloc[0]
            line = ax.errorbar(means[("rate", "mean")], means[("distortion", "mean")],
                               xerr=means[("rate", "sem")], yerr=means[("distortion", "sem")],
                               fmt="-o", markersize=4, capsize=2, label=f"{method} ({kind})")
            ax.scatter(group["rate"], group["distortion"], s=8, alpha=0.3,
                       color=line[0].get_color())
            low.errorbar(group["rate"], group["excess"], yerr=3 * group["excess_se"], fmt="o",
                         markersize=3, capsize=2, color=line[0].get_color(), label=method)
            limit = group["low_rate_limit"].dropna()
            if len(limit):
                ax.axvline(float(limit.iloc[0]), color=line[0].get_color(), linestyle="--",
                           linewidth=1, label="Echo low-rate limit")
        ax.set_xlabel("rate R (nats)")
        ax.set_ylabel("distortion D (nats)")
        ax.set_title(f"{source}: test points vs the true R-D curve")
        ax.grid(alpha=0.2)
        ax.legend(fontsize=7)
        low.axhline(0, color="k", linewidth=1)
        low.set_xlabel("rate R (nats)")
        low.set_ylabel("excess D - D(R) (nats), ± 3 errors")
        low.set_xlim(ax.get_xlim())
        low.grid(alpha=0.2)
    fig.tight_layout()
    fig.savefig(out / "known_answer.png", dpi=110)
    plt.close(fig)


def summary_lines(table) -> list[str]:
    lines = []
    for (source, method), group in table.groupby(["source", "method"], sort=False):
        lines.append(f"{source:16s} {method:10s} ({group['rate_kind'].iloc[0]}): excess over "
                     f"the curve min {group['excess'].min():.3f}, median "
                     f"{group['excess'].median():.3f}, max {group['excess'].max():.3f} nats; "
                     f"below the curve (> 3 errors): {int(group['below'].sum())} of {len(group)}")
    return lines


def split_methods(text: str) -> list[str]:
    """Commas outside brackets: "echo,echo[a=1,b=2]" -> ["echo", "echo[a=1,b=2]"]."""
    out, depth, start = [], 0, 0
    for i, ch in enumerate(text + ","):
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            out.append(text[start:i])
            start = i + 1
    return [m for m in out if m]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.known_answer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/results/known_answer")
    p.add_argument("--methods", default="echo,vae,iaf-prior",
                   help="comma-separated; a method with extra options as echo[f_range=8]")
    p.add_argument("--sources", default=",".join(SOURCES))
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--plot-only", action="store_true", help="only rebuild CSV, specs and plot")
    args = p.parse_args(argv)
    import pandas as pd
    import torch
    torch.set_num_threads(args.threads)
    sources = args.sources.split(",")
    bad = [s for s in sources if s not in SOURCES]
    if bad:
        print(f"error: --sources: unknown {bad}; choose from {list(SOURCES)}", file=sys.stderr)
        return 2
    out = Path(args.out)
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    write_specs(out, sources)
    if not args.plot_only:
        for source in sources:
            for method in split_methods(args.methods):
                for beta in BETAS[source]:
                    for seed in (int(s) for s in args.seeds.split(",")):
                        path = runs / f"{source}_{method}_b{beta:g}_s{seed}.json"
                        if path.exists():
                            continue
                        row = run_one(source, method, beta, seed, args.epochs)
                        path.write_text(json.dumps(row, indent=1) + "\n")
                        print(f"{source} {method} beta={beta:g} seed={seed}: R={row['rate']:.3f}"
                              f" D={row['distortion']:.3f} excess={row['excess']:.3f} "
                              f"± {row['excess_se']:.3f} ({row['train_seconds']} s)", flush=True)
    rows = [json.loads(p.read_text()) for p in sorted(runs.glob("*.json"))]
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    table = table[table["source"].isin(sources)].sort_values(
        ["source", "method", "beta", "seed"]).reset_index(drop=True)
    table.to_csv(out / "known_answer.csv", index=False, float_format="%.5g")
    plot(table, out, sources)
    for line in summary_lines(table):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
