"""Fidelity benchmark: do the paper's models learn, and how does Echo compare at equal budget?

    python -m benchmarks.fidelity [--methods echo,vae,iaf-prior] [--seeds 0,1] [--epochs 15]
                                  [--train-images 10000] [--test-images 10000] [--jobs 2]
                                  [--out docs/results/fidelity] [--data-root DIR]

The paper's recipe (App. B) scaled down for a CPU: binary MNIST, the paper's conv network, 32
latents, batch 100, Adam 3e-4 constant for the first half of training then linearly to 0, beta 1
(after the library's beta warm-up, docs/methods.md), `--train-images` of the training set for
`--epochs` epochs. Every (method, seed) is one `echo.train.fit` run with one thread, `--jobs`
at a time, each in its own process (in this one with `--jobs 1`). Each run appends its
per-epoch metrics to `<out>/runs/*.csv` as it goes, so an interrupted benchmark keeps the
curves it has. At the end it writes

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
import contextlib
import csv
import functools
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

from pipeline.results.paper import PAPER_TABLE_2

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "docs" / "results" / "fidelity"
FIELDS = ("method", "seed", "epoch", "epoch_lr", "epoch_seconds", "train_rate", "train_distortion",
          "train_neg_elbo", "test_rate", "test_distortion", "test_neg_elbo")


class TimeUp(Exception):
    """The benchmark's --time-limit passed: the run stops after the epoch it finished."""


def same_run(saved: dict, config) -> list[str]:
    """The settings in which a saved run differs from `config` (empty: it is this run): all but
    those declared free to change on resume (echo.settings `resume_free`); a setting the saved
    run predates had its default."""
    from dataclasses import fields
    from echo.settings import RESUME_FREE, default_of
    return sorted(f.name for f in fields(config) if not f.metadata.get(RESUME_FREE)
                  and saved.get(f.name, default_of(f)) != getattr(config, f.name))


def write_curve(path: Path, rows: list[dict]) -> None:
    from echo.files import atomic_write

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    atomic_write(path, write)


def run_one(job: dict) -> dict:
    """One (method, seed) training run, in a worker process; resumable.

    Files: job['csv'] (one row per epoch, appended as each ends), job['checkpoint'] (the run's
    checkpoint dict, echo/checkpoint.py, rewritten after every epoch) and job['final'] (the
    result row; `finished` false when --time-limit stopped it). A finished run is returned
    as saved; an unfinished one continues from its checkpoint's epoch (the curve is cut back
    to it), with the model, Adam, the schedule and the random state it had, so the result is
    the uninterrupted run's. Past job['deadline'] (a time.time() value) it stops after the
    current epoch; with job['iwae_k'] > 0 it adds the test -IWAE_k bound at the end."""
    torch.set_num_threads(job["threads"])
    from echo.checkpoint import load_checkpoint, save_checkpoint
    from echo.data import load_dataset
    from echo.files import atomic_write
    from echo.train import TrainConfig, fit, iwae_neg_log_likelihood, make_model
    config = TrainConfig(**job["config"])
    curve, ckpt, final = Path(job["csv"]), Path(job["checkpoint"]), Path(job["final"])
    if final.exists():
        saved = json.loads(final.read_text())
        differs = same_run(saved.get("config", {}), config)
        if differs:
            raise ValueError(f"{final} holds a run with other settings ({', '.join(differs)}); "
                             f"use another --out, or --fresh to start over")
        if saved.get("finished"):
            print(f"{config.method} seed {config.seed}: finished before "
                  f"({saved['epochs']} epochs), skipped", flush=True)
            return saved
    resume = None
    if ckpt.exists():
        resume = load_checkpoint(ckpt)
        differs = same_run(resume["config"], config)
        if differs:
            raise ValueError(f"checkpoint {ckpt} was trained with other settings "
                             f"({', '.join(differs)}); use another --out, or --fresh to "
                             f"start over")
        print(f"{config.method} seed {config.seed}: resuming after epoch {resume['epoch']} "
              f"of {config.epochs}", flush=True)
    history = list(resume["history"]) if resume else []
    write_curve(curve, [{"method": config.method, "seed": config.seed, **m} for m in history])
    stopped: dict = {}

    def on_epoch(epoch: int, metrics: dict, state) -> None:
        row = {"method": config.method, "seed": config.seed,
               **{k: metrics[k] for k in FIELDS if k in metrics}}
        snapshot = state()
        save_checkpoint(ckpt, snapshot)        # first: the curve never runs ahead of it
        with open(curve, "a", newline="") as fh:
            csv.DictWriter(fh, FIELDS).writerow(row)
        print(f"{config.method} seed {config.seed} epoch {epoch}/{config.epochs}: test rate "
              f"{metrics['test_rate']:.2f} distortion {metrics['test_distortion']:.2f} -ELBO "
              f"{metrics['test_neg_elbo']:.2f}", flush=True)
        if job.get("deadline") and time.time() > job["deadline"] and epoch < config.epochs:
            stopped.update(state=snapshot, metrics=metrics)
            raise TimeUp

    start = time.perf_counter()
    if resume is not None and resume["epoch"] >= config.epochs:
        snapshot, metrics = resume, resume["history"][-1]
    else:
        try:
            fit(config, on_epoch=on_epoch, resume=resume)
            snapshot = load_checkpoint(ckpt)
        except TimeUp:
            snapshot = stopped["state"]
        metrics = snapshot["history"][-1]
    model = make_model(config, tuple(snapshot["input_shape"]))
    model.load_state_dict(snapshot["model"])
    finished = metrics["epoch"] >= config.epochs
    from dataclasses import asdict
    from echo.settings import resume_free_settings
    row = {"method": config.method, "seed": config.seed, "epochs": metrics["epoch"],
           "finished": finished,
           "seconds": sum(m["epoch_seconds"] for m in snapshot["history"]),
           **{k: metrics[k] for k in ("test_rate", "test_distortion", "test_neg_elbo")},
           "iwae_k": 0, "test_iwae_neg_log_lik": math.nan,
           "config": {k: v for k, v in asdict(config).items()
                      if k not in resume_free_settings()}}
    if job.get("iwae_k", 0) > 0 and model.has_density:
        from echo.device import resolve_device
        device = resolve_device(config.device)
        x_test = load_dataset("binary_mnist", "test", config.data_root)[0][: config.test_limit]
        torch.manual_seed(config.seed)
        iwae_start = time.perf_counter()
        row["iwae_k"] = job["iwae_k"]
        row["test_iwae_neg_log_lik"] = iwae_neg_log_likelihood(
            model.to(device), x_test.to(device), job["iwae_k"], config.batch_size)
        row["iwae_seconds"] = time.perf_counter() - iwae_start
        print(f"{config.method} seed {config.seed}: test -IWAE_{job['iwae_k']} "
              f"{row['test_iwae_neg_log_lik']:.2f}", flush=True)
    atomic_write(final, lambda p: p.write_text(json.dumps(row, indent=2)))
    print(f"{config.method} seed {config.seed}: {'finished' if finished else 'stopped'} at "
          f"epoch {metrics['epoch']} ({time.perf_counter() - start:.0f} s in this call)",
          flush=True)
    return row


def read_finals(runs_dir: Path) -> list[dict]:
    """Every run's result row (runs/*.json), finished or stopped by --time-limit."""
    return [json.loads(p.read_text()) for p in sorted(runs_dir.glob("*.json"))]


def read_curves(runs_dir: Path) -> list[dict]:
    rows = []
    for path in sorted(runs_dir.glob("*.csv")):
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh):
                rows.append({k: (row[k] if k == "method" else float(row[k])) for k in row})
    return rows


SUMMARY_FIELDS = ["method", "rate", "rate_std", "distortion", "distortion_std", "neg_elbo",
                  "neg_elbo_std", "neg_elbo_ci95", "seeds", "unfinished", "iwae_k",
                  "iwae_neg_log_lik", "epochs"]

# Student t 0.975 quantiles by degrees of freedom (for a machine without scipy).
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262, 10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}


def t975(df: float) -> float:
    """The 0.975 quantile of Student's t (a 95% two-sided interval's multiplier)."""
    try:
        from scipy.stats import t
        return float(t.ppf(0.975, df))
    except ImportError:
        return _T975[min((k for k in _T975 if k >= df), default=30)]


def last_rows(rows: list[dict], method: str) -> dict[float, dict]:
    """Each seed's last epoch row of one method."""
    last: dict[float, dict] = {}
    for r in rows:
        if r["method"] == method and r["epoch"] >= last.get(r["seed"], {"epoch": -1})["epoch"]:
            last[r["seed"]] = r
    return last


def at_epoch(rows: list[dict], method: str, epoch: float) -> list[dict]:
    return [r for r in rows if r["method"] == method and r["epoch"] == epoch]


def summarise(rows: list[dict], finals: list[dict], epochs: int) -> list[dict]:
    """Per method, over seeds at the epoch every seed has reached (`epochs` once all are
    finished): mean and sample standard deviation of the test metrics, the 95% interval's
    half-width of the mean (t, n - 1), the number of seeds and of unfinished runs, and the
    mean test -IWAE_k of the runs whose final row holds one at that epoch."""
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        last = last_rows(rows, method)
        common = min(r["epoch"] for r in last.values())
        done = at_epoch(rows, method, common)
        entry = {"method": method, "seeds": len(done), "epochs": int(common),
                 "unfinished": sum(r["epoch"] < epochs for r in last.values())}
        for key in ("rate", "distortion", "neg_elbo"):
            values = [r[f"test_{key}"] for r in done]
            entry[key] = statistics.fmean(values)
            entry[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else math.nan
        n = len(done)
        entry["neg_elbo_ci95"] = t975(n - 1) * entry["neg_elbo_std"] / math.sqrt(n) \
            if n > 1 else math.nan
        iwae = [f["test_iwae_neg_log_lik"] for f in finals
                if f["method"] == method and f.get("iwae_k") and f["epochs"] == common]
        entry["iwae_neg_log_lik"] = statistics.fmean(iwae) if iwae else math.nan
        entry["iwae_k"] = next((f["iwae_k"] for f in finals if f["method"] == method
                                and f.get("iwae_k") and f["epochs"] == common), 0)
        out.append(entry)
    return out


def welch_difference(a: list[float], b: list[float]) -> tuple[float, float]:
    """mean(a) - mean(b) and the half-width of its 95% Welch interval (nan below 2 + 2)."""
    diff = statistics.fmean(a) - statistics.fmean(b)
    if len(a) < 2 or len(b) < 2:
        return diff, math.nan
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    if va + vb == 0:
        return diff, 0.0
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return diff, t975(df) * math.sqrt(va + vb)


def differences_markdown(rows: list[dict], epochs: int) -> str:
    """Echo's test -ELBO minus every other method's, over the seeds that finished, with a 95%
    Welch interval over seeds: the sentence the benchmark exists for."""
    finished = {m: [r["test_neg_elbo"] for r in at_epoch(rows, m, epochs)]
                for m in dict.fromkeys(r["method"] for r in rows)}
    if not finished.get("echo"):
        return ""
    lines = []
    for other, values in finished.items():
        if other == "echo" or not values:
            continue
        diff, half = welch_difference(finished["echo"], values)
        word = "behind" if diff > 0 else "ahead of"
        interval = (f"95% interval [{diff - half:+.2f}, {diff + half:+.2f}]"
                    if not math.isnan(half) else "no interval: fewer than 2 seeds each")
        verdict = ("" if math.isnan(half) else " (significant)" if abs(diff) > half
                   else " (level within the interval)")
        lines.append(f"- echo − {other}: {diff:+.2f} nats of test −ELBO after {epochs} epochs "
                     f"({interval}; {len(finished['echo'])} and {len(values)} seeds): echo is "
                     f"{word} {other}{verdict}.")
    return ("\nEcho against each method (negative: Echo better):\n\n" + "\n".join(lines) + "\n"
            if lines else "")


def table_markdown(summary: list[dict], marginal: float, floor: float, settings: dict) -> str:
    lines = ["| method | test rate | test distortion | test -ELBO | 95% interval | test -IWAE | "
             "seeds | epochs | paper R / D / -ELBO |", "|---|---|---|---|---|---|---|---|---|"]
    for s in sorted(summary, key=lambda s: s["neg_elbo"]):
        paper = PAPER_TABLE_2["binary_mnist"].get(s["method"])
        cells = [f"{s[k]:.2f} ± {s[k + '_std']:.2f}" if not math.isnan(s[k + "_std"])
                 else f"{s[k]:.2f}" for k in ("rate", "distortion", "neg_elbo")]
        ci = (f"± {s['neg_elbo_ci95']:.2f}" if not math.isnan(s["neg_elbo_ci95"]) else "–")
        iwae = (f"{s['iwae_neg_log_lik']:.2f} (k={s['iwae_k']})" if s["iwae_k"] else "–")
        partial = f" ({s['unfinished']} unfinished)" if s["unfinished"] else ""
        lines.append(f"| {s['method']} | " + " | ".join(cells) + f" | {ci} | {iwae} | "
                     f"{s['seeds']} | {s['epochs']}{partial} | "
                     + (" / ".join(f"{v}" for v in paper) if paper else "–") + " |")
    lines += ["", f"Pixel-marginal model (a code that carries nothing): distortion "
              f"{marginal:.2f} nats. Echo's low-rate limit at these settings: {floor:.2f} nats.",
              f"± is the sample standard deviation over seeds; the 95% interval is that of the "
              f"mean over seeds (t, n - 1). A method with unfinished runs is shown at the epoch "
              f"all its seeds have reached. Settings: {json.dumps(settings)}"]
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


def plot_curves(rows: list[dict], path: Path, marginal: float, settings: dict) -> None:
    """Left: test -ELBO per epoch (mean over seeds, band min..max) beside the pixel-marginal
    model. Right, when vae ran: each method's mean minus the VAE's at the same epoch, the
    question the benchmark asks at a scale where nats are visible (the left panel spans the
    ~100 nats of the first epochs)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    curves: dict[str, dict[float, list[float]]] = {}
    for r in rows:
        curves.setdefault(r["method"], {}).setdefault(r["epoch"], []).append(r["test_neg_elbo"])
    mean = {m: {e: statistics.fmean(v) for e, v in by_epoch.items()} for m, by_epoch in curves.items()}
    gap = "vae" in curves and len(curves) > 1
    fig, axes = plt.subplots(1, 2 if gap else 1, figsize=(12 if gap else 7, 4.5), squeeze=False)
    ax = axes[0][0]
    colors = {}
    for method, by_epoch in curves.items():
        epochs = sorted(by_epoch)
        line, = ax.plot(epochs, [mean[method][e] for e in epochs], marker="o", ms=3, label=method)
        colors[method] = line.get_color()
        ax.fill_between(epochs, [min(by_epoch[e]) for e in epochs],
                        [max(by_epoch[e]) for e in epochs], color=line.get_color(), alpha=0.2)
    ax.axhline(marginal, color="grey", ls="--", lw=1, label="pixel marginal (no code)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test -ELBO (nats)")
    net = "paper conv net" if settings["arch"] == "conv" else f"{settings['arch']} net"
    ax.set_title(f"binary MNIST, {net}, {settings['train_images']} training images, beta = 1\n"
                 f"(mean over seeds, band = min..max)", fontsize=10)
    low = min(r["test_neg_elbo"] for r in rows)
    ax.set_ylim(low - 5, max(marginal + 10, low + 20))
    ax.legend()
    ax.grid(alpha=0.3)
    if gap:
        ax = axes[0][1]
        gaps = []
        for method in curves:
            if method == "vae":
                continue
            epochs = sorted(e for e in mean[method] if e in mean["vae"])
            diff = [mean[method][e] - mean["vae"][e] for e in epochs]
            gaps += diff
            ax.plot(epochs, diff, marker="o", ms=3, color=colors[method], label=f"{method} − vae")
        ax.axhline(0, color=colors["vae"], lw=1, label="vae")
        ax.set_xlabel("epoch")
        ax.set_ylabel("test -ELBO minus the VAE's (nats; below 0: ahead)")
        ax.set_title("the same curves against the VAE (means over seeds)", fontsize=10)
        # The first epochs' gaps (~10 nats) would flatten the last ones (~1): show up to 12.
        ax.set_ylim(min(min(gaps), 0) - 0.5, min(max(max(gaps), 0), 12) + 0.5)
        ax.legend()
        ax.grid(alpha=0.3, which="both")
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
    p.add_argument("--jobs", type=int, default=2,
                   help="runs at a time, one process each (1: in this process)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-root", default=os.environ.get("ECHO_MNIST_DIR",
                                                         str(REPO.parent / "shared/data/mnist")))
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--iwae-k", type=int, default=0,
                   help="also the test -IWAE_k bound for methods with a density (0: off)")
    p.add_argument("--time-limit", type=float, default=0,
                   help="seconds after which every run stops at the end of its epoch (0: none)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a method option (echo.method_options), for every method that has it, "
                        "e.g. f_range=16 (repeatable)")
    p.add_argument("--checkpoints", default=None,
                   help="folder of the runs' checkpoints, rewritten after every epoch so that "
                        "the same command resumes (default <out>/checkpoints, git-ignored)")
    p.add_argument("--fresh", action="store_true",
                   help="start over: delete <out>'s curves, results and checkpoints first")
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
    from echo import method_options
    from echo.settings import parse_option
    options: dict = {}
    for text in args.option:
        try:
            key, value = parse_option(text)
        except argparse.ArgumentTypeError as err:
            p.error(str(err))
        if not any(key in method_options(m) for m in methods):
            p.error(f"--option {key}: no method of {methods} has it; options: "
                    f"{ {m: sorted(method_options(m)) for m in methods} }")
        options[key] = value
    if args.iwae_k < 0 or args.time_limit < 0:
        p.error("--iwae-k and --time-limit must be >= 0")

    x_train = load_dataset("binary_mnist", "train", args.data_root)[0][: args.train_images]
    x_test = load_dataset("binary_mnist", "test", args.data_root)[0][: args.test_images]
    marginal = pixel_marginal_nll(x_train, x_test)
    floor = echo_low_rate_limit(clip_factor(99), args.latent_dim)

    out = Path(args.out)
    runs_dir = out / "runs"
    checkpoints = Path(args.checkpoints) if args.checkpoints else out / "checkpoints"
    if args.fresh and not args.report_only:
        for stale in [*runs_dir.glob("*.csv"), *runs_dir.glob("*.json"),
                      *checkpoints.glob("*.pt")]:
            stale.unlink()
    runs_dir.mkdir(parents=True, exist_ok=True)
    checkpoints.mkdir(parents=True, exist_ok=True)
    settings = {"dataset": "binary_mnist", "arch": args.arch, "latent_dim": args.latent_dim,
                "batch_size": 100, "lr": args.lr, "lr_decay_start": 0.5, "beta": 1.0,
                "beta_warmup_steps": args.beta_warmup_steps, "epochs": args.epochs,
                "train_images": len(x_train), "test_images": len(x_test), "device": args.device,
                "method_options": options}
    deadline = time.time() + args.time_limit if args.time_limit else None
    jobs = [] if args.report_only else [
        {"threads": args.threads, "csv": str(runs_dir / f"{m}_seed{s}.csv"),
         "final": str(runs_dir / f"{m}_seed{s}.json"),
         "checkpoint": str(checkpoints / f"{m}_seed{s}.pt"),
         "deadline": deadline, "iwae_k": args.iwae_k,
         "config": {"method": m, "dataset": "binary_mnist", "data_root": args.data_root,
                    "arch": args.arch, "latent_dim": args.latent_dim, "beta": 1.0,
                    "epochs": args.epochs, "batch_size": 100, "lr": args.lr,
                    "beta_warmup_steps": args.beta_warmup_steps, "seed": s,
                    "device": args.device, "train_limit": args.train_images,
                    "test_limit": args.test_images, "progress": False,
                    "method_options": {k: v for k, v in options.items()
                                       if k in method_options(m)}}}
        for s in seeds for m in methods]
    command = "python -m benchmarks.fidelity " + " ".join(argv if argv is not None
                                                          else sys.argv[1:])
    previous = json.loads((out / "run.json").read_text()) if (out / "run.json").exists() else {}
    commands = [c for c in previous.get("commands", [previous.get("command")]) if c]
    print(f"{command}\n{len(jobs)} runs, {args.jobs} at a time (finished runs are skipped, "
          f"unfinished ones resume from {checkpoints}); pixel-marginal distortion "
          f"{marginal:.2f} nats, Echo low-rate limit {floor:.2f} nats", flush=True)
    start = time.perf_counter()
    failures = []
    # One run at a time (or one left) trains in this process: a pool's worker is a new
    # interpreter that imports torch again (~3 CPU-s), for nothing to run in parallel.
    with contextlib.ExitStack() as stack:
        if args.jobs == 1 or len(jobs) < 2:
            pending = [(job, functools.partial(run_one, job)) for job in jobs]
        else:
            pool = stack.enter_context(multiprocessing.get_context("spawn").Pool(args.jobs))
            pending = [(job, pool.apply_async(run_one, (job,)).get) for job in jobs]
        for job, result in pending:
            try:
                result()
            except Exception as err:           # one failed run must not lose the others
                failures.append(f"{job['config']['method']} seed {job['config']['seed']}: "
                                f"{type(err).__name__}: {err}")
                print(f"run failed: {failures[-1]}", file=sys.stderr, flush=True)
    if jobs and not failures and command not in commands:
        commands.append(command)
    finals = read_finals(runs_dir)
    rows = read_curves(runs_dir)
    summary = summarise(rows, finals, args.epochs)
    with open(out / "summary.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, SUMMARY_FIELDS)
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
    table += differences_markdown(rows, args.epochs)
    if rows:
        table += "\nTest −ELBO per epoch (mean over seeds):\n\n" + curves_markdown(rows)
    shown = "\n".join(f"    {c}" for c in commands)
    (out / "table.md").write_text(f"Commands (each run resumes and skips what is done):\n\n"
                                  f"{shown}\n\n{table}")
    if rows:
        try:
            plot_curves(rows, out / "neg_elbo.png", marginal, settings)
        except ImportError as err:            # e.g. a GPU machine without matplotlib
            print(f"no plot ({err}); the curves are in {runs_dir}", file=sys.stderr)
    (out / "run.json").write_text(json.dumps({
        "commands": commands, "settings": settings, "failures": failures,
        "training_seconds": {f"{f['method']}_seed{f['seed']}": f.get("seconds") for f in finals},
        "pixel_marginal_nll": marginal, "echo_low_rate_limit": floor,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "threads_per_run": args.threads, "torch": torch.__version__},
        "summary": summary}, indent=2))
    print(table)
    print(f"this call: {(time.perf_counter() - start) / 60:.1f} min", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
