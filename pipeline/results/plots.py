"""Figures of the frontier stage: rate-distortion curves and reconstructions along them.

- `rd_curves`: distortion against rate per method (paper Figs. 3-5): every evaluated trial
  (each seed) as a faint point, each point's mean over seeds with error bars of one standard
  error in rate and distortion, the Pareto frontier of the means as a line, its
  lower-convex-hull points filled; the legend says how each method's rate was obtained; dotted
  iso-lines R + D = const (equal -ELBO); Echo's low-rate limit -d_z log r (Sec. 5) dashed;
  where the data set's rate-distortion function is known (`truth`, an echo.known_answer.RDCurve:
  pipeline.results.known_answer.true_curve), that curve D(R) as a black dashed line, which no
  achievable point lies below.
- `reconstructions`: test images and the frontier models' reconstructions at the lowest, a
  middle and the highest rate of each method, each the mean of `samples` decoder outputs over
  independent encoder samples (the paper averages 10).
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")           # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from echo.files import atomic_write  # noqa: E402
from echo.train import load_model  # noqa: E402
from pipeline.results.aggregate import seed_points, seed_trials  # noqa: E402
from pipeline.colors import method_color  # noqa: E402
from pipeline.results.report import rate_kind_label  # noqa: E402

RECON_IMAGES = 8                # test images per row of reconstructions.png
LEVELS = ("low", "middle", "high")
LINE_STYLES = ("-", "--", "-.", ":")


def _save(fig, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: fig.savefig(p, dpi=120, bbox_inches="tight", format="png"))
    plt.close(fig)


def _iso_elbo_levels(total: np.ndarray) -> np.ndarray:
    """A few round values of R + D from the best -ELBO up to well past the plotted points."""
    low, high = float(np.min(total)), float(np.max(total))
    return MaxNLocator(nbins=5).tick_values(low, high + 0.5 * max(high - low, 1.0))


TRUTH_LABEL = "true R-D curve D(R) (known answer)"


def rd_curves(evaluation: pd.DataFrame, frontier: pd.DataFrame, path: str | Path, *,
              title: str = "", truth=None) -> plt.Figure:
    """Draw the R-D figure to `path` and return it (closed; its axes can still be read).
    `truth`: the data set's known curve (anything with `distortion_at(rates)`), or None."""
    points = seed_trials(evaluation)
    fig, ax = plt.subplots(figsize=(7, 5))
    if points.empty:
        ax.text(0.5, 0.5, "no completed trials", ha="center", va="center", transform=ax.transAxes)
        _save(fig, path)
        return fig
    means = seed_points(evaluation)
    seeds = int(means["n_seeds"].max())
    # A method's colour is its colour in MLflow too (pipeline.colors); several series of one
    # method (other archs or latent sizes) differ in line style.
    styles = {}
    for series, method in dict(zip(points["series"], points["method"])).items():
        taken = sum(m == method for m, _ in styles.values())
        styles[series] = (method, LINE_STYLES[taken % len(LINE_STYLES)])
    colors = {series: method_color(method) for series, (method, _) in styles.items()}
    for series, group in points.groupby("series", sort=False):
        color, style = colors[series], styles[series][1]
        ax.scatter(group["rate"], group["distortion"], color=color, alpha=0.25, s=10)
        mean = means[means["series"] == series]
        if seeds > 1:     # one standard error over seeds, both ways (NaN for a lone seed)
            ax.errorbar(mean["rate"], mean["distortion"], xerr=mean["rate_sem"],
                        yerr=mean["distortion_sem"], fmt="none", ecolor=color, elinewidth=1,
                        capsize=2, alpha=0.8)
        front = frontier[frontier["series"] == series].sort_values("rate")
        kind = rate_kind_label(group["rate_kind"].iloc[0])
        ax.plot(front["rate"], front["distortion"], marker="o", linestyle=style, color=color,
                markerfacecolor="white", markersize=5, label=f"{series} (rate: {kind})")
        hull = front[front["on_hull"].astype(bool)]
        ax.plot(hull["rate"], hull["distortion"], "o", color=color, markersize=5)
    # The low-rate limit -d_z log r belongs to the series whose rows carry one (an exact-rate
    # channel with a clipping factor), drawn in that series' colour.
    limits = points.dropna(subset=["low_rate_limit"]).drop_duplicates("low_rate_limit")
    for i, row in enumerate(limits.sort_values("low_rate_limit").itertuples()):
        ax.axvline(row.low_rate_limit, color=colors.get(row.series, "black"), linestyle="--",
                   linewidth=1, label="Echo low-rate limit $-d_z \\log r$" if i == 0 else None)
    xlim, ylim = ax.get_xlim(), ax.get_ylim()
    xlim = (min(0.0, xlim[0]), xlim[1])
    if truth is not None:
        # Over the whole rate axis; the distortion axis is widened down to the curve (the
        # excess of the points over it is what the line shows), not up to D(0).
        grid = np.linspace(max(xlim[0], 0.0), xlim[1], 200)
        curve = np.asarray(truth.distortion_at(grid), dtype=np.float64)
        ax.plot(grid, curve, "--", color="black", linewidth=1.2, label=TRUTH_LABEL, zorder=1)
        low = float(np.min(curve))
        if low < ylim[0]:
            ylim = (low - 0.05 * (ylim[1] - low), ylim[1])
    rate_grid = np.linspace(*xlim, 2)
    for level in _iso_elbo_levels(points["rate"] + points["distortion"]):
        ax.plot(rate_grid, level - rate_grid, ":", color="gray", linewidth=0.8, zorder=0)
        # Label each line where it enters the axes (left edge, else top edge).
        x_text, y_text = (xlim[0], level - xlim[0]) if level - xlim[0] <= ylim[1] \
            else (level - ylim[1], ylim[1])
        if xlim[0] <= x_text <= xlim[1] and ylim[0] <= y_text <= ylim[1]:
            ax.text(x_text, y_text, f" −ELBO={level:g}", color="gray", fontsize=7, va="top")
    ax.set_xlim(xlim)
    ax.set_ylim(ylim)
    ax.set_xlabel("rate R (nats)")
    ax.set_ylabel("distortion D (nats)")
    ax.set_title(title or "Rate-distortion (test set); dotted: R + D = const")
    if seeds > 1:
        ax.text(0.99, 0.01, f"mean of {seeds} seeds ± 1 standard error; faint: each seed",
                ha="right", va="bottom", fontsize=7, transform=ax.transAxes)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.2)
    _save(fig, path)
    return fig


def pick_levels(front: pd.DataFrame) -> list[tuple[str, pd.Series]]:
    """The lowest-, a middle- and the highest-rate frontier point (fewer if the frontier is
    shorter)."""
    front = front.sort_values("rate").reset_index(drop=True)
    picks = dict(zip(LEVELS, (0, len(front) // 2, len(front) - 1)))
    chosen, seen = [], set()
    for level, index in picks.items():
        if index not in seen:
            seen.add(index)
            chosen.append((level, front.iloc[index]))
    return chosen


@torch.no_grad()
def mean_reconstruction(checkpoint: str | Path, x: torch.Tensor, samples: int, seed: int = 0,
                        device: str = "cpu") -> torch.Tensor:
    """The decoder likelihood's means (Bernoulli: sigmoid of the logits; Gaussian: the
    output) averaged over `samples` encoder samples, for the images of x.

    x is passed as one batch of at least the training batch size where available, because
    Echo draws each example's noise from the other examples of the batch.
    """
    model, config = load_model(checkpoint, device=device)
    model.eval()
    torch.manual_seed(seed)
    batch = x[: max(config.batch_size, RECON_IMAGES)].to(device)
    mean = torch.zeros_like(batch)
    for _ in range(samples):
        mean += model.likelihood.mean(model(batch, config.beta).logits)
    return (mean / samples).cpu()


def reconstructions(frontier: pd.DataFrame, x_test: torch.Tensor, path: str | Path, *,
                    samples: int, device: str = "cpu") -> None:
    rows = [("data", x_test[:RECON_IMAGES])]
    for series, front in frontier.groupby("series", sort=False):
        for level, point in pick_levels(front):
            recon = mean_reconstruction(point["checkpoint"], x_test, samples, device=device)
            rows.append((f"{series} ({level})\nβ={point['beta']:g} R={point['rate']:.1f}",
                         recon[:RECON_IMAGES]))
    count = min(RECON_IMAGES, len(x_test))
    fig, axes = plt.subplots(len(rows), count, figsize=(1.0 * count + 1.6, 1.0 * len(rows)),
                             squeeze=False)
    for r, (label, images) in enumerate(rows):
        for c in range(count):
            ax = axes[r, c]
            ax.imshow(images[c].permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
    fig.suptitle(f"test images and reconstructions (mean of {samples} encoder samples)",
                 fontsize=9)
    _save(fig, path)
