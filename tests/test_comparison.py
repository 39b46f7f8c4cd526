"""Seeds, error bars, the curve-against-curve score and the kind of every rate:
echo.frontier.curve_gap / bootstrap_curve_gap on curves whose gap is known in closed form,
pipeline.results.aggregate's means and standard errors, pipeline.results.comparison's table and labels, and
each method's `rate_kind` against how its rate actually behaves."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from echo import METHODS, build_model
from echo.frontier import bootstrap_curve_gap, curve_gap, hull_curve


# ---- curve_gap on closed-form curves --------------------------------------------------------
def test_gap_between_two_lines_is_the_closed_form_average():
    # a: D = 10 - R on [0, 5]; b: D = 8 - R/2 on [1, 6]. Over R in [1, 5]:
    # mean of (10 - R) - (8 - R/2) = mean of 2 - R/2 = 2 - 3/2 = 0.5.
    # Inverted, a: R = 10 - D on D in [5, 10], b: R = 16 - 2D on [5, 7.5]. Over D in [5, 7.5]:
    # mean of (10 - D) - (16 - 2D) = mean of D - 6 = 6.25 - 6 = 0.25.
    ra, rb = np.linspace(0, 5, 6), np.linspace(1, 6, 11)
    gap = curve_gap(ra, 10 - ra, rb, 8 - rb / 2)
    assert gap.distortion_gap == pytest.approx(0.5)
    assert (gap.rate_low, gap.rate_high) == (1.0, 5.0)
    assert gap.rate_gap == pytest.approx(0.25)
    assert (gap.distortion_low, gap.distortion_high) == (5.0, 7.5)
    # Swapping the curves flips the signs and keeps the ranges.
    back = curve_gap(rb, 8 - rb / 2, ra, 10 - ra)
    assert back.distortion_gap == pytest.approx(-0.5) and back.rate_gap == pytest.approx(-0.25)


def test_gap_is_exact_between_breakpoints_not_sampled():
    # Two hulls with different breakpoints: a = (0,4) (2,1) (4,0); b shifted down by 1 but
    # sampled only at its ends and its middle, b = (0,3) (2,0) (4,-1). The difference is 1
    # everywhere, so the average is exactly 1 whatever grid the breakpoints make.
    gap = curve_gap([0, 2, 4], [4, 1, 0], [0, 2, 4], [3, 0, -1])
    assert gap.distortion_gap == pytest.approx(1.0, abs=1e-12)
    # A convex curve D = 1/R against its own chords: a point above the hull is ignored.
    r = np.array([0.5, 1.0, 2.0, 4.0])
    noisy_r, noisy_d = np.append(r, 1.5), np.append(1 / r, 5.0)     # (1.5, 5) is dominated
    assert curve_gap(noisy_r, noisy_d, r, 1 / r).distortion_gap == pytest.approx(0.0, abs=1e-12)


def test_gap_of_curves_without_common_range_is_none_or_nan():
    assert curve_gap([0, 1], [5, 4], [2, 3], [1, 0]) is None       # disjoint in R and in D
    assert curve_gap([1.0], [2.0], [0, 3], [3, 1]) is None          # a single point is no curve
    # Overlap in D only, D in [4, 4.5]: a is R = 5 - D, b is R = 6.5 - D, 1.5 nats apart.
    half = curve_gap([0, 1], [5, 4], [2, 3], [4.5, 3.5])
    assert math.isnan(half.distortion_gap) and half.rate_gap == pytest.approx(-1.5)
    assert (half.distortion_low, half.distortion_high) == (4.0, 4.5)


def test_hull_curve_rises_in_rate_and_falls_in_distortion():
    rate, dist = hull_curve([3, 0, 1, 2, 2.5], [0, 3, 2, 1, 2])
    assert rate.tolist() == [0, 1, 2, 3] and dist.tolist() == [3, 2, 1, 0]


# ---- the bootstrap over seeds -----------------------------------------------------------------
def test_bootstrap_interval_covers_the_seed_spread_and_is_nan_for_one_seed():
    r = np.array([1.0, 2.0, 4.0])
    # Method a: three seeds whose curves lie 1, 2 and 3 nats above b's D = 10 - R.
    rate_a = np.tile(r, (3, 1))
    dist_a = np.stack([10 - r + shift for shift in (1.0, 2.0, 3.0)])
    out = bootstrap_curve_gap(rate_a, dist_a, [r], [10 - r], resamples=500, seed=1)
    assert out["distortion_gap"] == pytest.approx(2.0)          # the mean curve's gap
    assert 1.0 <= out["distortion_gap_low"] < 2.0 < out["distortion_gap_high"] <= 3.0
    assert (out["seeds_a"], out["seeds_b"]) == (3, 1)
    single = bootstrap_curve_gap([r], [10 - r + 1], [r], [10 - r])
    assert single["distortion_gap"] == pytest.approx(1.0)
    assert math.isnan(single["distortion_gap_low"]) and math.isnan(single["distortion_gap_high"])


def test_bootstrap_skips_failed_runs_and_checks_shapes():
    r = np.array([1.0, 2.0, 4.0])
    dist = np.stack([10 - r, 10 - r + 2])
    dist[1, 1] = np.nan                                          # seed 1 diverged at beta 2
    out = bootstrap_curve_gap(np.tile(r, (2, 1)), dist, [r], [10 - r], resamples=200)
    assert math.isfinite(out["distortion_gap"]) and math.isfinite(out["distortion_gap_high"])
    with pytest.raises(ValueError, match="rate_a and distortion_a"):
        bootstrap_curve_gap([[1, 2]], [[1, 2, 3]], [r], [10 - r])
    with pytest.raises(ValueError, match="level"):
        bootstrap_curve_gap([r], [10 - r], [r], [10 - r], level=95)


# ---- aggregation over seeds and the comparison table ------------------------------------------
def _evaluation(points: dict[str, list[tuple[float, float, float]]], seeds=(0, 1, 2),
                shift=None) -> pd.DataFrame:
    """Completed trials: per method a list of (beta, rate, distortion); seed s adds shift(s)."""
    from pipeline.results.evaluation import EVALUATION_COLUMNS
    kinds = {"echo": "exact", "vae": "analytic_kl", "vae-vamp": "single_sample_bound"}
    rows = []
    for method, curve in points.items():
        for seed in seeds:
            for beta, rate, dist in curve:
                d = dist + (shift(method, seed) if shift else 0.0)
                rows.append({"trial_id": f"{method}_b{beta:g}_seed{seed}", "method": method,
                             "dataset": "digits", "arch": "mlp", "latent_dim": 32, "beta": beta,
                             "seed": seed, "lr": 1e-3, "clip_factor": np.nan,
                             "status": "completed", "error": "", "checkpoint": "",
                             "rate": rate, "rate_kind": kinds[method], "distortion": d,
                             "neg_elbo": rate + d, "iwae_k": np.nan, "iwae_neg_log_lik": np.nan,
                             "low_rate_limit": np.nan, "note": ""})
    return pd.DataFrame(rows, columns=list(EVALUATION_COLUMNS))


CURVES = {"vae": [(0.5, 10.0, 30.0), (1.0, 6.0, 34.0), (2.0, 3.0, 40.0)],
          "echo": [(0.5, 12.0, 27.0), (1.0, 8.0, 30.0), (2.0, 6.0, 33.0)]}


def test_seed_points_give_mean_and_standard_error():
    from pipeline.results.aggregate import seed_points
    evaluation = _evaluation(CURVES, shift=lambda m, s: [0.0, 1.0, 2.0][s])
    points = seed_points(evaluation)
    assert len(points) == 6 and set(points["n_seeds"]) == {3}
    p = points[(points["method"] == "vae") & (points["beta"] == 1.0)].iloc[0]
    assert p["distortion"] == pytest.approx(35.0)                    # 34 + mean(0, 1, 2)
    assert p["distortion_sem"] == pytest.approx(1 / math.sqrt(3))     # sd 1 over 3 seeds
    assert p["rate_sem"] == pytest.approx(0.0) and p["seeds"] == "0 1 2"
    assert p["trial_id"] == "vae_b1_seed0" and p["rate_kind"] == "analytic_kl"
    one = seed_points(evaluation[evaluation["seed"] == 0])
    assert one["n_seeds"].eq(1).all() and one["distortion_sem"].isna().all()


def test_comparison_puts_echo_first_and_says_what_it_compares():
    from pipeline.results.comparison import comparison_lines, comparison_metrics, comparison_table
    evaluation = _evaluation(CURVES, shift=lambda m, s: [0.0, 0.5, 1.0][s] if m == "echo" else 0)
    table = comparison_table(evaluation, resamples=300)
    assert len(table) == 1
    row = table.iloc[0]
    assert (row["series_a"], row["series_b"]) == ("echo", "vae")         # exact-rate first
    assert (row["rate_kind_a"], row["rate_kind_b"]) == ("exact", "analytic_kl")
    expected = curve_gap([12, 8, 6], [27.5, 30.5, 33.5], [10, 6, 3], [30, 34, 40])
    assert row["distortion_gap"] == pytest.approx(expected.distortion_gap)
    assert row["distortion_gap"] < 0                                       # echo is lower
    assert row["distortion_gap_low"] <= row["distortion_gap"] <= row["distortion_gap_high"]
    assert (row["rate_low"], row["rate_high"]) == (6.0, 10.0)
    assert "overstated" in row["note"]
    line = comparison_lines(table)[0]
    assert line.startswith(f"- **echo vs vae**: {row['distortion_gap']:+.2f} nats of distortion "
                           f"at equal rate over R in [6.0, 10.0] (95% bootstrap interval")
    assert "over 3 and 3 seeds" in line
    metrics = comparison_metrics(table)["echo_vs_vae"]
    assert metrics["distortion_gap"] == pytest.approx(row["distortion_gap"])
    assert {"distortion_gap_low", "distortion_gap_high", "rate_low", "rate_high"} <= set(metrics)


def test_comparison_of_two_bounds_has_no_exact_rate_warning():
    from pipeline.results.comparison import comparison_table
    curves = {"vae": CURVES["vae"], "vae-vamp": [(b, r + 1, d - 1) for b, r, d in CURVES["vae"]]}
    row = comparison_table(_evaluation(curves, seeds=(0,)), resamples=10).iloc[0]
    assert (row["series_a"], row["series_b"]) == ("vae", "vae-vamp")
    assert row["note"] == "both rates are upper bounds (analytic_kl, single_sample_bound)"
    assert math.isnan(row["distortion_gap_low"])                  # one seed: no interval


# ---- rate provenance: what each method's rate kind promises ---------------------------------
@pytest.mark.parametrize("method", sorted(METHODS))
def test_rate_kind_matches_how_the_rate_behaves(method):
    """exact and analytic_kl rates are functions of x (the same for every encoder sample);
    a single-sample bound changes from sample to sample. Checked on a fresh model."""
    torch.manual_seed(0)
    model = build_model(method, arch="mlp", latent_dim=4, input_shape=(1, 8, 8))
    x = (torch.rand(16, 1, 8, 8) < 0.5).float()
    with torch.no_grad():
        first, second = (model.rate(model.encode(x)) for _ in range(2))
    kind = model.rate_kind
    assert kind in ("exact", "analytic_kl", "single_sample_bound")
    assert (kind == "exact") == (method == "echo")
    if kind == "single_sample_bound":
        assert not torch.allclose(first, second)
    else:
        assert torch.allclose(first, second)
