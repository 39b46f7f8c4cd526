"""Known-answer sources, the Gaussian decoder, a user's .npz and the check of trained points
against a rate-distortion curve known in closed form (echo/known_answer.py)."""
import json
import math

import numpy as np
import pytest
import torch

from echo import build_model
from echo.data import DataError, dataset_spec, load_dataset, load_splits, prepare
from echo.data.sets import binary_source
from echo.known_answer import (RDCurve, check_model, check_points, dataset_curve, known_curve,
                               per_example, point_error)
from echo.methods import METHODS
from echo.networks import Bernoulli, Gaussian, gaussian_nll, make_likelihood
from echo.train import TrainConfig, fit, load_model, main
from support.params import tiny_params, write_params

pytestmark = pytest.mark.usefixtures("one_thread")


def binary_entropy(p):
    return -(p * np.log(p) + (1 - p) * np.log1p(-p))


# --- the sources -------------------------------------------------------------------------------

def test_entropy_by_enumeration_equals_the_closed_form_of_one_template():
    probs = np.array([[0.1, 0.3, 0.5, 0.8, 0.95]])
    assert binary_source.mixture_entropy(probs, [1.0]) == pytest.approx(
        binary_entropy(probs).sum(), rel=1e-12)
    # Two templates that cannot be confused (deterministic, different pixels): + H(weights).
    two = np.array([[1e-15, 1e-15], [1 - 1e-15, 1 - 1e-15]])
    w = np.array([0.3, 0.7])
    assert binary_source.mixture_entropy(two, w) == pytest.approx(-(w * np.log(w)).sum(), abs=1e-9)


def test_binary_source_is_deterministic_and_its_samples_match_its_entropy():
    spec = dataset_spec("binary_source").known_answer()
    h = spec["rd"]["entropy"]
    a, b = (load_splits("binary_source", splits=("test",)).splits["test"][0] for _ in range(2))
    assert np.array_equal(a, b) and a.shape == (10_000, 1, 4, 4) and a.dtype == np.uint8
    # The mean of -log p(x) over the test samples estimates H(X): a wrong H would show.
    log_p = binary_source.mixture_log_prob(a.reshape(len(a), -1).astype(float),
                                           np.array(spec["templates"]), spec["weights"])
    assert -log_p.mean() == pytest.approx(h, abs=4 * log_p.std() / math.sqrt(len(a)))
    assert dataset_spec("binary_source").likelihood == "bernoulli"


def test_gaussian_source_has_its_stated_variances_and_declares_its_decoder():
    spec = dataset_spec("gaussian_source")
    x = load_dataset("gaussian_source", "train")[0].flatten(1).double()
    stated = torch.tensor(spec.known_answer()["variances"], dtype=torch.float64)
    assert x.shape == (20_000, 8)
    assert torch.allclose(x.var(0) / stated, torch.ones(8, dtype=torch.float64), atol=0.05)
    assert (spec.likelihood, spec.tau) == ("gaussian", spec.known_answer()["tau"])


def test_prepare_records_the_spec_and_the_likelihood_in_the_manifest(tmp_path):
    manifest = prepare("gaussian_source", tmp_path / "raw", tmp_path / "prep")
    assert manifest["declared_likelihood"] == {"likelihood": "gaussian", "tau": 0.5}
    assert manifest["known_answer"]["variances"] == [s * s for s in
                                                     manifest["known_answer"]["stds"]]
    assert manifest["splits"]["test"]["dtype"] == "float32"
    binary = prepare("binary_source", tmp_path / "raw", tmp_path / "prep")
    assert binary["known_answer"]["rd"]["entropy"] == pytest.approx(
        dataset_spec("binary_source").known_answer()["rd"]["entropy"])


# --- the curves --------------------------------------------------------------------------------

def test_water_filling_matches_closed_forms():
    one = RDCurve("gaussian_mse", variances=(2.0,), tau=1.0)
    for r in (0.0, 0.3, 2.0):                         # 1-d: D_mse = sigma^2 exp(-2R)
        assert float(one.mse_at(r)) == pytest.approx(2.0 * math.exp(-2 * r))
    var = (4.0, 1.0, 0.25)
    curve = RDCurve("gaussian_mse", variances=var, tau=0.5)
    assert float(curve.mse_at(0.0)) == pytest.approx(sum(var))
    for level in (3.0, 0.5, 0.1):                     # R(lambda) forward, then back
        rate = sum(max(0.0, 0.5 * math.log(v / level)) for v in var)
        assert float(curve.water_level(rate)) == pytest.approx(level)
        assert float(curve.mse_at(rate)) == pytest.approx(sum(min(level, v) for v in var))
    const = 1.5 * math.log(2 * math.pi * 0.25)
    assert float(curve.distortion_at(0.0)) == pytest.approx(sum(var) / 0.5 + const)
    # The slope is -lambda / tau^2 (finite differences).
    r, h = 1.3, 1e-5
    numeric = (curve.distortion_at(r + h) - curve.distortion_at(r - h)) / (2 * h)
    assert float(numeric) == pytest.approx(float(curve.slope_at(r)), rel=1e-4)


def test_a_curve_is_known_only_for_the_decoder_it_was_stated_for():
    binary = dataset_spec("binary_source").known_answer()
    assert known_curve(binary, Bernoulli()).kind == "log_loss"
    assert known_curve(binary, Gaussian(0.5)) is None
    assert dataset_curve("gaussian_source", Gaussian(0.5)).tau == 0.5
    assert dataset_curve("gaussian_source", Bernoulli()) is None
    assert dataset_curve("digits", Bernoulli()) is None


# --- the Gaussian decoder ----------------------------------------------------------------------

def test_gaussian_nll_is_the_normal_log_density_with_its_constant():
    mean, x = torch.randn(5, 1, 2, 3), torch.randn(5, 1, 2, 3)
    expected = -torch.distributions.Normal(mean, 0.7).log_prob(x).flatten(1).sum(1)
    assert torch.allclose(gaussian_nll(mean, x, 0.7), expected, atol=1e-5)
    with pytest.raises(ValueError, match="gaussian_tau must be a number > 0"):
        Gaussian(0.0)
    with pytest.raises(ValueError, match="unknown likelihood 'laplace'"):
        make_likelihood("laplace")
    with pytest.raises(ValueError, match="likelihood must be one of"):
        TrainConfig(likelihood="normal")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_takes_the_gaussian_decoder_and_its_rate_does_not_change(method):
    x = torch.randn(6, 1, 1, 8)
    models = {}
    for name, likelihood in (("bernoulli", None), ("gaussian", Gaussian(0.5))):
        torch.manual_seed(0)
        models[name] = build_model(method, arch="mlp", latent_dim=4, input_shape=(1, 1, 8),
                                   likelihood=likelihood,
                                   **({"batch_size": 6} if method == "echo" else {}))
    outs = {}
    for name, model in models.items():
        torch.manual_seed(1)
        outs[name] = model(x, 1.0)
    assert torch.allclose(outs["bernoulli"].rate, outs["gaussian"].rate)
    assert torch.allclose(outs["gaussian"].distortion,
                          gaussian_nll(outs["gaussian"].logits, x, 0.5))
    if models["gaussian"].has_density:                # the IWAE bound uses the same p(x|z)
        assert torch.isfinite(models["gaussian"].iwae_bound(x, k=3)).all()


# --- trained points against the truth ----------------------------------------------------------

@pytest.mark.parametrize("source,method,beta,within", [("binary_source", "echo", 1.0, 2.0),
                                                       ("gaussian_source", "vae", 1.0, 2.0)])
def test_trained_points_lie_above_the_true_curve_and_a_halved_rate_is_caught(
        source, method, beta, within, tmp_path):
    config = TrainConfig(method=method, dataset=source, arch="mlp", latent_dim=8, beta=beta,
                         epochs=1, lr=1e-3, beta_warmup_steps=50, seed=0, progress=False,
                         out=str(tmp_path))
    model = fit(config).model
    curve = dataset_curve(source, model.likelihood)
    x_test = load_dataset(source, "test")[0]
    torch.manual_seed(0)
    point = check_model(model, x_test, curve, batch_size=100, beta=beta)
    # Above the curve (up to noise) and close to it after 200 steps.
    assert not point["below"]
    assert -3 * point["excess_se"] < point["excess"] < within
    # The same point with its rate scaled by 0.5: below the curve, and flagged.
    halved = check_points(curve, 0.5 * point["rate"], point["distortion"], point["excess_se"])
    assert bool(halved["below"]) and float(halved["excess"]) < -3 * point["excess_se"]
    # A reloaded checkpoint keeps the data set's decoder.
    reloaded, _ = load_model(tmp_path / "checkpoint.pt")
    assert reloaded.likelihood == model.likelihood


def test_point_error_is_the_spread_of_the_linearised_excess():
    curve = RDCurve("log_loss", entropy=5.0)
    rates, distortions = np.array([1.0, 2.0, 3.0, 4.0]), np.array([4.0, 3.5, 2.0, 2.5])
    assert point_error(curve, rates, distortions) == pytest.approx(
        np.std(rates + distortions, ddof=1) / 2)


def test_the_evaluate_stage_columns_flag_a_point_below_the_curve(tmp_path, capsys):
    from pipeline.results.known_answer import known_answer_columns
    config = TrainConfig(method="vae", dataset="gaussian_source", arch="mlp", latent_dim=8,
                         epochs=1, lr=1e-3, beta_warmup_steps=50, seed=0, progress=False)
    model = fit(config).model
    x = load_dataset("gaussian_source", "test")[0][:2000]
    rates, distortions = per_example(model, x, 100)
    row = {"rate": float(rates.mean()), "distortion": float(distortions.mean())}
    honest = known_answer_columns(model, config, x, 100, row)
    assert not honest["below_curve"] and honest["excess"] > -3 * honest["excess_se"]
    lying = known_answer_columns(model, config, x, 100, {**row, "rate": 0.5 * row["rate"]})
    assert lying["below_curve"]
    assert "KNOWN-ANSWER CHECK FAILED: vae" in capsys.readouterr().err
    digits = TrainConfig(method="vae", dataset="digits")
    assert known_answer_columns(build_model("vae", arch="mlp", input_shape=(1, 8, 8)), digits,
                                torch.zeros(4, 1, 8, 8), 4, row) == {}


def test_evaluate_checkpoint_gives_the_known_answer_columns(tmp_path):
    from pipeline.results.evaluation import EVALUATION_COLUMNS, evaluate_checkpoint
    fit(TrainConfig(method="echo", dataset="gaussian_source", arch="mlp", latent_dim=4,
                    epochs=1, train_limit=300, seed=0, progress=False, out=str(tmp_path)))
    x = load_dataset("gaussian_source", "test")[0][:500]
    row = evaluate_checkpoint(tmp_path / "checkpoint.pt", x, batch_size=100, iwae_k=1,
                              device=torch.device("cpu"))
    assert {"curve_distortion", "excess", "excess_se", "below_curve"} <= set(EVALUATION_COLUMNS)
    curve = dataset_curve("gaussian_source", Gaussian(0.5))
    assert row["curve_distortion"] == pytest.approx(float(curve.distortion_at(row["rate"])))
    assert row["excess"] == pytest.approx(row["distortion"] - row["curve_distortion"])
    assert row["excess_se"] > 0 and row["below_curve"] is False


def test_the_frontier_figure_gets_the_curve_of_the_params_data_set_and_decoder():
    from pipeline.config import Params
    from pipeline.results.known_answer import true_curve
    gaussian = Params.model_validate({"data": {"dataset": "gaussian_source"}})
    assert true_curve(gaussian).tau == 0.5
    wider = Params.model_validate({"data": {"dataset": "gaussian_source"},
                                   "train": {"gaussian_tau": 1.0}})
    assert true_curve(wider).tau == 1.0
    assert true_curve(Params.model_validate({"data": {"dataset": "binary_source"}})).entropy == \
        pytest.approx(6.4581630)
    assert true_curve(Params()) is None                       # digits: no known answer


def _evaluation_csv(path, dataset):
    """Two methods' test points a little above binary_source's curve R + D = H(X) = 6.458."""
    import pandas as pd
    from pipeline.results.evaluation import EVALUATION_COLUMNS
    rows = [dict(trial_id=f"{m}{i}", method=m, beta=b, rate=r, distortion=d, seed=0)
            for m, points in {"echo": [(0.5, 3.0, 3.9), (1.0, 2.0, 4.8)],
                              "vae": [(0.5, 3.5, 3.3), (1.0, 1.5, 5.2)]}.items()
            for i, (b, r, d) in enumerate(points)]
    table = pd.DataFrame([{"dataset": dataset, "arch": "mlp", "latent_dim": 8, "lr": 1e-3,
                           "status": "completed", "error": "", "checkpoint": "", "note": "",
                           "rate_kind": "exact" if r["method"] == "echo" else "analytic_kl",
                           **r} for r in rows])
    table["neg_elbo"] = table["rate"] + table["distortion"]
    table.reindex(columns=list(EVALUATION_COLUMNS)).to_csv(path, index=False)


@pytest.mark.parametrize("dataset", ["binary_source", "gaussian_source", "digits",
                                     "binary_mnist"])
def test_the_frontier_stage_draws_the_true_curve_where_the_data_set_has_one(
        tmp_path, monkeypatch, dataset):
    """stages.frontier passes params.yaml's known curve to rd_curves, which draws it as one
    labelled black dashed line through D(R); a data set without a known answer gets none."""
    import matplotlib.colors
    import stages.frontier
    from pipeline.config import Params
    from pipeline.results.known_answer import true_curve
    from pipeline.results.plots import TRUTH_LABEL, rd_curves
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(f"data: {{dataset: {dataset}}}\n")
    (tmp_path / "results").mkdir()
    _evaluation_csv(tmp_path / "results" / "evaluation.csv", dataset)
    (tmp_path / "results" / "comparison.csv").write_text("a,b\n")
    figures = []
    monkeypatch.setattr(stages.frontier, "rd_curves",
                        lambda *a, **k: figures.append(rd_curves(*a, **k)))
    # No prepared data here: the stage stops at the reconstructions, after the R-D figure.
    stages.frontier.main(["--params", "params.yaml"])
    assert (tmp_path / "results" / "rd_curves.png").stat().st_size > 0
    [figure] = figures
    [ax] = figure.axes
    truth = [line for line in ax.get_lines() if line.get_label() == TRUTH_LABEL]
    curve = true_curve(Params.model_validate({"data": {"dataset": dataset}}))
    if curve is None:
        assert dataset in ("digits", "binary_mnist") and truth == []
        assert TRUTH_LABEL not in ax.get_legend_handles_labels()[1]
        return
    [line] = truth
    assert TRUTH_LABEL in ax.get_legend_handles_labels()[1]
    assert line.get_linestyle() == "--"
    assert matplotlib.colors.to_hex(line.get_color()) == "#000000"
    rates, distortions = line.get_data()
    assert rates.min() <= 0.0 + 1e-12 and rates.max() >= 3.5          # spans the rate axis
    np.testing.assert_allclose(distortions, curve.distortion_at(rates))
    visible = (rates >= 1.5) & (rates <= 3.5)                       # where the points are
    assert ax.get_ylim()[0] <= distortions[visible].min()


@pytest.mark.parametrize("dataset, likelihood, refused", [
    ("gaussian_source", "bernoulli", True),     # real values under a Bernoulli decoder
    ("gaussian_source", None, False),           # its own decoder: Gaussian
    ("binary_source", None, False),
    ("digits", None, False),                    # grey levels in [0, 1]: a Bernoulli is fine
])
def test_the_sweep_refuses_real_valued_data_under_a_bernoulli_decoder(
        tmp_path, monkeypatch, capsys, dataset, likelihood, refused):
    """Before Ray starts: one line naming data.dataset, the decoder and the fix; no tracking
    store, no experiment folder. Data in [0, 1] under a Bernoulli decoder passes the check."""
    from pipeline.sweep.checks import check_inputs
    from pipeline.config import Params
    from pipeline.stage_files import DEFAULT_FILES
    from stages.sweep import main as sweep_main
    settings = tiny_params("decoder", run=False, data={"dataset": dataset},
                           train={"epochs": 1} | ({"likelihood": likelihood} if likelihood else {}),
                           sweep={"betas": [1.0], "train_limit": 100})
    monkeypatch.chdir(tmp_path)
    if not refused:
        check_inputs(Params.model_validate(settings), tmp_path, DEFAULT_FILES)
        return
    write_params(tmp_path, settings)
    assert sweep_main(["--params", "params.yaml"]) == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "data.dataset='gaussian_source'" in line and "outside [0, 1]" in line
    assert "Bernoulli" in line and "train.likelihood: bernoulli" in line
    assert "set train.likelihood: gaussian" in line
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "ray_results").exists()


# --- a user's own arrays -----------------------------------------------------------------------

def write_npz(folder, **arrays):
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "user.npz", **arrays)
    return folder / "user.npz"


def test_a_users_npz_loads_in_every_shape_and_goes_into_the_manifest(tmp_path):
    rng = np.random.default_rng(0)
    write_npz(tmp_path / "raw" / "user_npz", train_x=rng.normal(size=(300, 5)),
              test_x=rng.normal(size=(100, 5)), test_y=np.arange(100))
    d = load_splits("user_npz", tmp_path / "raw")
    assert d.splits["train"][0].shape == (300, 1, 1, 5) and d.splits["train"][0].dtype == np.float32
    assert d.splits["valid"][0].shape == (0, 1, 1, 5)
    assert d.splits["test"][1].tolist() == list(range(100)) and "real-valued" in d.variant
    manifest = prepare("user_npz", tmp_path / "raw", tmp_path / "prep")
    (raw,) = manifest["raw_files"]
    assert raw["path"].endswith("user.npz") and len(raw["sha256"]) == 64
    # Binary images [N, H, W] stay binary, as uint8 [N, 1, H, W].
    write_npz(tmp_path / "bin", train_x=rng.random((50, 3, 4)) < 0.5,
              test_x=rng.random((20, 3, 4)) < 0.5)
    d = load_splits("user_npz", tmp_path / "bin")
    assert d.splits["test"][0].shape == (20, 1, 3, 4) and d.splits["test"][0].dtype == np.uint8


@pytest.mark.parametrize("arrays,message", [
    ({"train_x": np.zeros((5, 3))}, r"user.npz: no array 'test_x'"),
    ({"train_x": np.zeros((5, 3)), "test_x": np.zeros((5, 4))},
     r"user.npz: array 'test_x' has examples of shape \[1, 1, 4\] but train_x has \[1, 1, 3\]"),
    ({"train_x": np.full((5, 3), np.nan), "test_x": np.zeros((5, 3))},
     r"user.npz: array 'train_x' has 15 non-finite values"),
    ({"train_x": np.zeros((5,)), "test_x": np.zeros((5, 3))},
     r"user.npz: array 'train_x' has shape \(5,\); expected \[N, d\]"),
    ({"train_x": np.zeros((5, 3)), "test_x": np.zeros((5, 3)), "test_y": np.zeros(4, int)},
     r"user.npz: array 'test_y' has shape \(4,\)"),
    ({"train_x": np.zeros((5, 3)), "test_x": np.zeros((5, 3)), "extra": np.zeros(1)},
     r"user.npz: unknown array\(s\) \['extra'\]"),
])
def test_a_bad_user_npz_is_one_line_naming_the_file_and_the_array(tmp_path, arrays, message):
    write_npz(tmp_path, **arrays)
    with pytest.raises(DataError, match=message) as err:
        load_splits("user_npz", tmp_path)
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match=r"user_npz: no .*user.npz .*numpy.savez"):
        load_splits("user_npz", tmp_path / "empty")


def test_real_valued_user_data_needs_the_gaussian_decoder(tmp_path, capsys):
    rng = np.random.default_rng(1)
    write_npz(tmp_path, train_x=rng.normal(size=(200, 6)), test_x=rng.normal(size=(50, 6)))
    common = ["--dataset", "user_npz", "--data-root", str(tmp_path), "--arch", "mlp",
              "--latent-dim", "2", "--epochs", "1", "--method", "vae", "--no-progress"]
    assert main(common) == 2
    err = capsys.readouterr().err
    assert "values outside [0, 1]" in err and "--likelihood gaussian" in err
    assert err.count("\n") == 1
    out = tmp_path / "run"
    assert main(common + ["--likelihood", "gaussian", "--gaussian-tau", "0.5",
                          "--out", str(out)]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert math.isfinite(metrics["test_neg_elbo"])
    model, config = load_model(out / "checkpoint.pt")
    assert model.likelihood == Gaussian(0.5) and config.likelihood == "gaussian"
