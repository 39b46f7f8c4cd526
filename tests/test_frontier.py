"""R-D frontier and lower convex hull on hand-made point sets, and against brute force."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from echo.frontier import lower_convex_hull, rd_frontier


def test_dominated_points_are_dropped():
    rate = [1.0, 2.0, 3.0, 2.5, 4.0]
    dist = [10.0, 6.0, 5.0, 7.0, 5.5]      # (2.5, 7) is dominated by (2, 6); (4, 5.5) by (3, 5)
    assert rd_frontier(rate, dist).tolist() == [True, True, True, False, False]


def test_ties_keep_one_point_and_the_better_coordinate():
    rate = [1.0, 1.0, 2.0, 2.0, 3.0, 4.0]
    dist = [9.0, 9.0, 5.0, 6.0, 4.0, 4.0]
    # Identical (1, 9): the first is kept. Equal rate 2: the lower distortion wins.
    # Equal distortion 4: the lower rate wins.
    assert rd_frontier(rate, dist).tolist() == [True, False, True, False, True, False]


def test_non_finite_points_are_never_on_the_frontier():
    rate = [np.nan, 1.0, 0.5, np.inf]
    dist = [0.0, 3.0, -np.inf, 0.0]
    assert rd_frontier(rate, dist).tolist() == [False, True, False, False]
    assert lower_convex_hull(rate, dist).tolist() == [False, True, False, False]


def test_hull_drops_frontier_points_above_a_chord():
    rate = [0.0, 1.0, 2.0, 3.0, 5.0]
    dist = [10.0, 5.0, 4.0, 0.0, 1.0]
    # (2, 4) is Pareto-optimal but above the chord (1, 5)-(3, 0) (2.5 at rate 2);
    # (5, 1) is dominated by (3, 0).
    assert rd_frontier(rate, dist).tolist() == [True, True, True, True, False]
    assert lower_convex_hull(rate, dist).tolist() == [True, True, False, True, False]


def test_collinear_points_lie_on_the_hull():
    rate = [3.0, 0.0, 1.0, 2.0]             # unsorted on purpose
    dist = [0.0, 3.0, 2.0, 1.0]
    assert lower_convex_hull(rate, dist).all()


def test_single_and_empty_point_sets():
    assert rd_frontier([2.0], [3.0]).tolist() == [True]
    assert lower_convex_hull([2.0], [3.0]).tolist() == [True]
    assert rd_frontier([], []).tolist() == []
    with pytest.raises(ValueError, match="same length"):
        rd_frontier([1.0, 2.0], [1.0])


points = st.lists(st.tuples(st.integers(0, 12), st.integers(0, 12)), min_size=1, max_size=25)


@settings(max_examples=200, deadline=None)
@given(points)
def test_frontier_matches_brute_force_dominance(pts):
    rate, dist = (np.array(c, dtype=float) for c in zip(*pts))
    mask = rd_frontier(rate, dist)
    for i in range(len(pts)):
        dominated = any((rate[j] <= rate[i] and dist[j] <= dist[i]
                         and (rate[j] < rate[i] or dist[j] < dist[i])) for j in range(len(pts)))
        duplicate_before = any(rate[j] == rate[i] and dist[j] == dist[i] for j in range(i))
        assert mask[i] == (not dominated and not duplicate_before)
    # Sorted by rate the frontier is strictly decreasing in distortion.
    order = np.argsort(rate[mask])
    assert np.all(np.diff(dist[mask][order]) < 0)


@settings(max_examples=200, deadline=None)
@given(points)
def test_hull_matches_brute_force_chords(pts):
    """A frontier point is on the lower hull iff it lies on or below every chord between two
    frontier points on either side of it (the minimisers of D + beta R, beta >= 0)."""
    rate, dist = (np.array(c, dtype=float) for c in zip(*pts))
    front = np.flatnonzero(rd_frontier(rate, dist))
    hull = lower_convex_hull(rate, dist)
    assert not np.any(hull & ~rd_frontier(rate, dist))
    for i in front:
        above_a_chord = any(
            dist[i] > dist[j] + (dist[k] - dist[j]) * (rate[i] - rate[j]) / (rate[k] - rate[j])
            for j in front for k in front if rate[j] < rate[i] < rate[k])
        assert hull[i] == (not above_a_chord)


# ---- the frontier stage's tables (pipeline/results/frontier.py, pipeline/results/report.py) -------------------
def _evaluation(rows):
    import pandas as pd
    from pipeline.results.evaluation import EVALUATION_COLUMNS
    base = {"dataset": "binary_mnist", "arch": "conv", "latent_dim": 32, "seed": 0, "lr": 3e-4,
            "clip_factor": np.nan, "status": "completed", "error": "", "checkpoint": "",
            "iwae_k": np.nan, "iwae_neg_log_lik": np.nan, "low_rate_limit": np.nan, "note": ""}
    kinds = {"echo": "exact", "vae": "analytic_kl"}
    rows = [{"rate_kind": kinds.get(r["method"], "single_sample_bound"), **r} for r in rows]
    table = pd.DataFrame([{**base, **r} for r in rows])
    table["neg_elbo"] = table["rate"] + table["distortion"]
    return table.reindex(columns=list(EVALUATION_COLUMNS))   # columns not given: empty


EVALUATION_ROWS = [
    dict(trial_id="e1", method="echo", beta=1.5, rate=20.0, distortion=70.0),
    dict(trial_id="e2", method="echo", beta=0.5, rate=30.0, distortion=60.0),
    dict(trial_id="e3", method="echo", beta=1.0, rate=26.0, distortion=62.0),   # best at beta 1
    dict(trial_id="e4", method="echo", beta=2.0, rate=25.0, distortion=75.0),   # dominated by e1
    dict(trial_id="v1", method="vae", beta=1.0, rate=25.0, distortion=68.0, iwae_k=100,
         iwae_neg_log_lik=91.0),
    dict(trial_id="v2", method="vae", beta=0.3, rate=40.0, distortion=66.0),    # above the chord
    dict(trial_id="v3", method="vae", beta=0.1, rate=60.0, distortion=50.0),
    dict(trial_id="v4", method="vae", beta=3.0, rate=np.nan, distortion=np.nan, status="nonfinite",
         error="non-finite training loss at epoch 3"),
]


def test_frontier_table_per_method_with_hull_flags():
    from pipeline.results.frontier import excluded, frontier_table
    evaluation = _evaluation(EVALUATION_ROWS)
    front = frontier_table(evaluation)
    by_method = {m: g for m, g in front.groupby("method")}
    # e4 (25, 75) is dominated by e1 (20, 70); frontier sorted by rate.
    assert by_method["echo"]["trial_id"].tolist() == ["e1", "e3", "e2"]
    assert by_method["vae"]["trial_id"].tolist() == ["v1", "v2", "v3"]
    # v2 (40, 66) lies above the chord v1 (25, 68) - v3 (60, 50): on the frontier, off the hull.
    assert by_method["vae"]["on_hull"].tolist() == [True, False, True]
    assert excluded(evaluation)["trial_id"].tolist() == ["v4"]
    assert set(front["series"]) == {"echo", "vae"}


def test_table_2_puts_the_paper_beside_the_best_trial_at_beta_1():
    from pipeline.results.comparison import comparison_table
    from pipeline.results.evaluation import metrics_summary
    from pipeline.results.frontier import frontier_table
    from pipeline.results.report import report
    evaluation = _evaluation(EVALUATION_ROWS + [
        # a second Optuna sample of echo's beta-1 point (same seed): the lower D + R is kept
        dict(trial_id="e5", method="echo", beta=1.0, rate=30.0, distortion=65.0)])
    comparison = comparison_table(evaluation)
    text = report(evaluation, frontier_table(evaluation), comparison, "binary_mnist")
    echo_row = next(line for line in text.splitlines() if line.startswith("| echo |"))
    # e3 (-ELBO 88) beats e5 (95) at beta = 1; the paper's Echo: 26.8 / 61.9 / 88.7.
    assert echo_row.split(" | ")[1:5] == ["26.0", "exact", "62.0", "88.0"]
    assert "e3" in echo_row and echo_row.rstrip(" |").endswith("26.8 | 61.9 | 88.7")
    assert "91.0 (100)" in next(line for line in text.splitlines() if line.startswith("| vae |"))
    assert "`v4` (nonfinite): non-finite training loss at epoch 3" in text
    assert metrics_summary(evaluation)["neg_elbo.echo"] == 88.0
    # No paper columns for a data set the paper did not use.
    assert "paper R" not in report(evaluation, frontier_table(evaluation), comparison, "digits")
    # One line per pair in words, Echo first, with the provenance of the two rates.
    line = next(line for line in text.splitlines() if line.startswith("- **echo vs vae**"))
    assert "nats of distortion at equal rate" in line and "no interval: one seed each" in line
    assert "echo's rate is exact, vae's an upper bound (analytic kl)" in line.lower()


def test_in_words_says_whether_echos_low_rate_limit_binds_at_beta_1():
    """table.md's "In words" names Echo's low-rate limit at beta = 1 and whether another method's
    rate there lies below it (where Echo cannot go at that latent size)."""
    from pipeline.results.comparison import comparison_table
    from pipeline.results.frontier import frontier_table
    from pipeline.results.report import report

    def words(echo_limit: float) -> str:
        rows = [{**r, "low_rate_limit": echo_limit} if r["method"] == "echo" else r
                for r in EVALUATION_ROWS]
        evaluation = _evaluation(rows)
        text = report(evaluation, frontier_table(evaluation), comparison_table(evaluation),
                      "digits")
        return next(line for line in text.splitlines() if "low-rate limit" in line)

    binds = words(25.5)           # vae's beta-1 rate 25.0 lies below echo's limit
    assert "echo's rate at β = 1 is 26.00 nats" in binds and "is 25.50" in binds
    assert "The limit binds: vae 25.00 nats lie below it" in binds
    free = words(5.74)
    assert "is 5.74" in free and "does not bind" in free and "vae" not in free
