"""Fidelity benchmark: do the paper's models learn, and how does Echo compare at equal budget?

    python -m benchmarks.fidelity [--methods echo,vae,iaf-prior] [--seeds 0,1] [--epochs 15]
                                  [--train-images 10000] [--test-images 10000] [--jobs 2]
                                  [--out docs/results/fidelity] [--data-root DIR]

The paper's recipe (App. B) scaled down for a CPU: binary MNIST, the paper's conv network, 32
latents, batch 100, Adam 3e-4 constant for the first half of training then linearly to 0, beta 1
(after the library's beta warm-up, docs/methods.md), `--train-images` of the training set for
`--epochs` epochs. Every (method, seed) is one `echo.train.fit` run in its own process with one
thread (`--jobs` at a time). Each run appends its per-epoch metrics to `<out>/runs/*.csv` as it
goes, so an interrupted benchmark keeps the curves it has. At the end it writes

- `summary.csv`: per method the test rate, distortion and -ELBO (nats, last epoch), mean and
  sample standard deviation over seeds, and the number of seeds;
- `table.md`: the same as a table, beside the pixel-marginal model and the paper's Table 2;
- `neg_elbo.png`: test -ELBO per epoch for each method (mean over seeds, band = min..max);
- `run.json`: the command, the settings, the wall time and the machine.

A model that learned nothing has the pixel-marginal distortion (`pixel_marginal_nll`) and, for
Echo, the rate of its low-rate limit; both are printed beside the results.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from pipeline.paper import PAPER_TABLE_2

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "docs" / "results" / "fidelity"
FIELDS = ("method", "seed", "epoch", "lr", "epoch_seconds", "train_rate", "train_distortion",
          "train_neg_elbo", "test_rate", "test_distortion", "test_neg_elbo")


class TimeUp(Exception):
    """The benchmark's --time-limit passed: the run stops after the epoch it finished."""


def run_one(job: dict) -> dict:
    """One (method, seed) training run; appends each epoch to job['csv']. Runs in a worker.
    Past job['deadline'] (a time.time() value) it stops after the current epoch and reports
    the model as it is then; with job['iwae_k'] > 0 it adds the test -IWAE_k bound."""
    torch.set_num_threads(job["threads"])
    from echo.data import load_dataset
    from echo.train import TrainConfig, fit, iwae_neg_log_likelihood, make_model
    config = TrainConfig(**job["config"])
    stopped: dict = {}
    path = Path(job["csv"])
    with open(path, "w", newline="") as fh:
        csv.DictWriter(fh, FIELDS).writeheader()

    def on_epoch(epoch: int, metrics: dict, state) -> None:
        row = {"method": config.method, "seed": config.seed,
               **{k: metrics[k] for k in FIELDS if k in metrics}}
        with open(path, "a", newline="") as fh:
            csv.DictWriter(fh, FIELDS).writerow(row)
            fh.flush()
        print(f"{config.method} seed {config.seed} epoch {epoch}/{config.epochs}: test rate "
              f"{metrics['test_rate']:.2f} distortion {metrics['test_distortion']:.2f} -ELBO "
              f"{metrics['test_neg_elbo']:.2f}", flush=True)
        if job.get("deadline") and time.time() > job["deadline"] and epoch < config.epochs:
            stopped.update(state=state(), metrics=metrics)
            raise TimeUp

    start = time.perf_counter()
    try:
        result = fit(config, on_epoch=on_epoch)
        model, metrics = result.model, result.metrics
    except TimeUp:
        snapshot = stopped["state"]
        model = make_model(config, tuple(snapshot["input_shape"]))
        model.load_state_dict(snapshot["model"])
        metrics = stopped["metrics"]
    row = {"method": config.method, "seed": config.seed, "epochs": metrics["epoch"],
           "seconds": time.perf_counter() - start,
           **{k: metrics[k] for k in ("test_rate", "test_distortion", "test_neg_elbo")},
           "iwae_k": 0, "test_iwae_neg_log_lik": math.nan}
    if job.get("iwae_k", 0) > 0 and model.has_density:
        device = next(model.parameters()).device
        x_test = load_dataset("binary_mnist", "test", config.data_root)[0][: config.test_limit]
        torch.manual_seed(config.seed)
        row["iwae_k"] = job["iwae_k"]
        row["test_iwae_neg_log_lik"] = iwae_neg_log_likelihood(
            model.to(device), x_test.to(device), job["iwae_k"], config.batch_size)
        print(f"{config.method} seed {config.seed}: test -IWAE_{job['iwae_k']} "
              f"{row['test_iwae_neg_log_lik']:.2f}", flush=True)
    return row


def read_curves(runs_dir: Path) -> list[dict]:
    rows = []
    for path in sorted(runs_dir.glob("*.csv")):
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh):
                rows.append({k: (row[k] if k == "method" else float(row[k])) for k in row})
    return rows


def summarise(rows: list[dict], epochs: int) -> list[dict]:
    """Per method: mean and sample std over seeds of the last epoch's test metrics (runs that
    did not reach `epochs` are left out and counted in `unfinished`)."""
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        last = {}
        for r in rows:
            if r["method"] == method:
                last[r["seed"]] = r if r["epoch"] >= last.get(r["seed"], {"epoch": -1})["epoch"] \
                    else last[r["seed"]]
        done = [r for r in last.values() if r["epoch"] >= epochs]
        entry = {"method": method, "seeds": len(done), "unfinished": len(last) - len(done)}
        for key in ("rate", "distortion", "neg_elbo"):
            values = [r[f"test_{key}"] for r in done]
            entry[key] = statistics.fmean(values) if values else math.nan
            entry[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else math.nan
        out.append(entry)
    return out


def table_markdown(summary: list[dict], marginal: float, floor: float, settings: dict) -> str:
    lines = ["| method | test rate | test distortion | test -ELBO | seeds | paper R / D / -ELBO |",
             "|---|---|---|---|---|---|"]
    for s in sorted(summary, key=lambda s: s["neg_elbo"]):
        paper = PAPER_TABLE_2["binary_mnist"].get(s["method"])
        cells = [f"{s[k]:.2f} ± {s[k + '_std']:.2f}" if not math.isnan(s[k + "_std"])
                 else f"{s[k]:.2f}" for k in ("rate", "distortion", "neg_elbo")]
        lines.append(f"| {s['method']} | " + " | ".join(cells) + f" | {s['seeds']} | "
                     + (" / ".join(f"{v}" for v in paper) if paper else "–") + " |")
    lines += ["", f"Pixel-marginal model (a code that carries nothing): distortion "
              f"{marginal:.2f} nats. Echo's low-rate limit at these settings: {floor:.2f} nats.",
              f"± is the sample standard deviation over seeds. Settings: {json.dumps(settings)}"]
    return "\n".join(lines) + "\n"


def curves_markdown(rows: list[dict], every: int = 3) -> str:
    """Mean test -ELBO per method at every `every`-th epoch (and the last): how the gaps move."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    means: dict[tuple[str, float], list[float]] = {}
    for r in rows:
        means.setdefault((r["method"], r["epoch"]), []).append(r["test_neg_elbo"])
    epochs = sorted({r["epoch"] for r in rows})
    shown = [e for e in epochs if int(e) % every == 1 or every == 1] + \
        ([epochs[-1]] if epochs and int(epochs[-1]) % every != 1 else [])
    lines = ["| epoch | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for e in shown:
        cells = [f"{statistics.fmean(means[(m, e)]):.2f}" if (m, e) in means else "–"
                 for m in methods]
        lines.append(f"| {int(e)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(rows: list[dict], path: Path, marginal: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(r["method"] for r in rows):
        by_epoch: dict[float, list[float]] = {}
        for r in rows:
            if r["method"] == method:
                by_epoch.setdefault(r["epoch"], []).append(r["test_neg_elbo"])
        epochs = sorted(by_epoch)
        mean = [statistics.fmean(by_epoch[e]) for e in epochs]
        line, = ax.plot(epochs, mean, marker="o", ms=3, label=method)
        ax.fill_between(epochs, [min(by_epoch[e]) for e in epochs],
                        [max(by_epoch[e]) for e in epochs], color=line.get_color(), alpha=0.2)
    ax.axhline(marginal, color="grey", ls="--", lw=1, label="pixel marginal (no code)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test -ELBO (nats)")
    ax.set_title("binary MNIST, paper conv net, beta = 1 (mean over seeds, band = min..max)")
    low = min(r["test_neg_elbo"] for r in rows)
    ax.set_ylim(low - 5, max(marginal + 10, low + 20))
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from echo import METHODS, clip_factor, echo_low_rate_limit
    from echo.data import load_dataset
    from echo.networks import pixel_marginal_nll
    from echo.train import BETA_WARMUP_STEPS
    p = argparse.ArgumentParser(prog="python -m benchmarks.fidelity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="echo,vae,iaf-prior")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--train-images", type=int, default=10_000)
    p.add_argument("--test-images", type=int, default=10_000)
    p.add_argument("--arch", default="conv")
    p.add_argument("--latent-dim", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--beta-warmup-steps", type=int, default=BETA_WARMUP_STEPS)
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, one process each")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-root", default=os.environ.get("ECHO_MNIST_DIR",
                                                         str(REPO.parent / "shared/data/mnist")))
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--iwae-k", type=int, default=0,
                   help="also the test -IWAE_k bound for methods with a density (0: off)")
    p.add_argument("--time-limit", type=float, default=0,
                   help="seconds after which every run stops at the end of its epoch (0: none)")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: rewrite summary, table and plot from <out>/runs/*.csv")
    p.add_argument("--table-csv", default=None,
                   help="also write method,rate,distortion,neg_elbo,iwae_k,iwae_neg_log_lik,"
                        "epochs,seeds (means over seeds) to this file")
    args = p.parse_args(argv)

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"--methods: unknown {unknown}; choose from {sorted(METHODS)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if args.epochs < 1 or args.train_images < 100 or args.test_images < 2 or args.jobs < 1:
        p.error("--epochs and --jobs must be >= 1, --train-images >= 100, --test-images >= 2")
    if args.iwae_k < 0 or args.time_limit < 0:
        p.error("--iwae-k and --time-limit must be >= 0")

    x_train = load_dataset("binary_mnist", "train", args.data_root)[0][: args.train_images]
    x_test = load_dataset("binary_mnist", "test", args.data_root)[0][: args.test_images]
    marginal = pixel_marginal_nll(x_train, x_test)
    floor = echo_low_rate_limit(clip_factor(99), args.latent_dim)

    out = Path(args.out)
    runs_dir = out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        for stale in runs_dir.glob("*.csv"):
            stale.unlink()
    settings = {"dataset": "binary_mnist", "arch": args.arch, "latent_dim": args.latent_dim,
                "batch_size": 100, "lr": args.lr, "lr_decay_start": 0.5, "beta": 1.0,
                "beta_warmup_steps": args.beta_warmup_steps, "epochs": args.epochs,
                "train_images": len(x_train), "test_images": len(x_test), "device": args.device}
    deadline = time.time() + args.time_limit if args.time_limit else None
    jobs = [] if args.report_only else [{"threads": args.threads, "csv": str(runs_dir / f"{m}_seed{s}.csv"),
             "deadline": deadline, "iwae_k": args.iwae_k,
             "config": {"method": m, "dataset": "binary_mnist", "data_root": args.data_root,
                        "arch": args.arch, "latent_dim": args.latent_dim, "beta": 1.0,
                        "epochs": args.epochs, "batch_size": 100, "lr": args.lr,
                        "beta_warmup_steps": args.beta_warmup_steps, "seed": s,
                        "device": args.device, "train_limit": args.train_images,
                        "test_limit": args.test_images, "progress": False}}
            for s in seeds for m in methods]
    command = "python -m benchmarks.fidelity " + " ".join(argv if argv is not None
                                                          else sys.argv[1:])
    print(f"{command}\n{len(jobs)} runs, {args.jobs} at a time; pixel-marginal distortion "
          f"{marginal:.2f} nats, Echo low-rate limit {floor:.2f} nats", flush=True)
    start = time.perf_counter()
    failures, finals = [], []
    if args.report_only:
        previous = json.loads((out / "run.json").read_text()) if (out / "run.json").exists() \
            else {}
        command = previous.get("command", command)
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        pending = [(job, pool.apply_async(run_one, (job,))) for job in jobs]
        for job, handle in pending:
            try:
                finals.append(handle.get())
            except Exception as err:           # one failed run must not lose the others
                failures.append(f"{job['config']['method']} seed {job['config']['seed']}: "
                                f"{type(err).__name__}: {err}")
                print(f"run failed: {failures[-1]}", file=sys.stderr, flush=True)
    wall = time.perf_counter() - start
    if args.report_only:
        wall = previous.get("wall_seconds", wall)

    rows = read_curves(runs_dir)
    # Runs stopped by --time-limit count with the epochs they reached.
    summary = summarise(rows, min([args.epochs] + [f["epochs"] for f in finals]))
    for entry in summary:
        iwae = [f["test_iwae_neg_log_lik"] for f in finals
                if f["method"] == entry["method"] and f["iwae_k"]]
        entry["iwae_neg_log_lik"] = statistics.fmean(iwae) if iwae else math.nan
        entry["iwae_k"] = args.iwae_k if iwae else 0
        entry["epochs"] = min((f["epochs"] for f in finals if f["method"] == entry["method"]),
                              default=0)
    with open(out / "summary.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, ["method", "rate", "rate_std", "distortion",
                                     "distortion_std", "neg_elbo", "neg_elbo_std", "seeds",
                                     "unfinished", "iwae_k", "iwae_neg_log_lik", "epochs"])
        writer.writeheader()
        writer.writerows(summary)
    if args.table_csv:
        Path(args.table_csv).parent.mkdir(parents=True, exist_ok=True)
        with open(args.table_csv, "w", newline="") as fh:
            writer = csv.DictWriter(fh, ["method", "rate", "distortion", "neg_elbo", "iwae_k",
                                         "iwae_neg_log_lik", "epochs", "seeds"],
                                    extrasaction="ignore")
            writer.writeheader()
            writer.writerows(summary)
    table = table_markdown(summary, marginal, floor, settings)
    if rows:
        table += "\nTest −ELBO per epoch (mean over seeds):\n\n" + curves_markdown(rows)
    (out / "table.md").write_text(f"Command: `{command}` ({wall / 60:.1f} min)\n\n{table}")
    if rows:
        try:
            plot_curves(rows, out / "neg_elbo.png", marginal)
        except ImportError as err:            # e.g. a GPU machine without matplotlib
            print(f"no plot ({err}); the curves are in {runs_dir}", file=sys.stderr)
    (out / "run.json").write_text(json.dumps({
        "command": command, "settings": settings, "wall_seconds": wall, "failures": failures,
        "pixel_marginal_nll": marginal, "echo_low_rate_limit": floor,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "torch": torch.__version__}, "summary": summary}, indent=2))
    print(table)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
