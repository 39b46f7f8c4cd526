"""The sweep end to end: real Ray (local, one instance for the module), real MLflow on SQLite in
tmp_path, the digits data and an MLP for a couple of epochs."""
from __future__ import annotations

import math
import os
import signal
from pathlib import Path

import pandas as pd
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("mlflow")
pytest.importorskip("optuna")

from ray import tune  # noqa: E402
from ray.tune.search import Searcher  # noqa: E402

from echo.train import load_model  # noqa: E402
from pipeline.config import Params  # noqa: E402
from pipeline.sweep.experiment import experiment_uid, fingerprint  # noqa: E402
from pipeline.sweep.search import GridPointASHA  # noqa: E402
from pipeline.sweep.run import (SweepError, SweepInterrupted, connect_ray,  # noqa: E402
                                run_sweep, tune_config)
from pipeline.sweep.trainable import train_config  # noqa: E402
from pipeline.records import CSV_COLUMNS  # noqa: E402
from echo.metrics import EPOCH_METRICS  # noqa: E402
from stages.sweep import main as stage_main  # noqa: E402
from support.params import EVERY_EPOCH, as_params  # noqa: E402
from support.params import tiny_params as support_tiny_params  # noqa: E402
from support.tracking import sweep_runs  # noqa: E402

# One worker runs this module (its local Ray with 8 logical CPUs is started once); the other
# worker runs the rest of the suite meanwhile.
pytestmark = pytest.mark.xdist_group("sweep_8cpu_ray")


@pytest.fixture(scope="module", autouse=True)
def ray_instance():
    """One local Ray for all tests here; 8 logical CPUs so that 8 trials can run at once
    (logical: on 2 cores they take turns)."""
    started = connect_ray(num_cpus=8)
    yield
    if started:
        ray.shutdown()


def tiny_params(name: str, **sweep) -> Params:
    """Echo and VAE at two betas on 150 digits, a checkpoint every epoch, tracked in
    ./mlflow.db under the experiment "test"; `sweep` changes the sweep (and `train=`)."""
    return as_params(support_tiny_params(
        name, run=False, train={"lr": 3e-3, **sweep.pop("train", {})},
        sweep={"methods": ["echo", "vae"], "train_limit": 150, "test_limit": 60,
               "max_concurrent": 2, **EVERY_EPOCH, **sweep},
        tracking={"uri": "sqlite:///mlflow.db", "experiment": "test"}))


def mlflow_runs(root: Path):
    return sweep_runs(root / "mlflow.db", "test")


class EpochLog(tune.Callback):
    """Every (trial, epoch) the trials report: the count of trainings."""

    def __init__(self):
        self.epochs: list[tuple[str, int]] = []
        self.completed: list[str] = []
        self.live = self.most_live = 0
        self.pids: set[int] = set()                 # worker processes that trained

    def on_trial_start(self, iteration, trials, trial, **info):
        self.live += 1
        self.most_live = max(self.most_live, self.live)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "epoch" in result and result.get("status") == "running":
            self.epochs.append((trial.config["trial_id"], int(result["epoch"])))
            self.pids.add(result["pid"])

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.live -= 1
        self.completed.append(trial.config["trial_id"])


class InterruptAfterFirstTrial(EpochLog):
    """Stops the sweep as Ctrl-C would (Tune's SIGUSR1 handler) once one trial has finished."""

    def on_trial_complete(self, iteration, trials, trial, **info):
        super().on_trial_complete(iteration, trials, trial, **info)
        if len(self.completed) == 1:
            os.kill(os.getpid(), signal.SIGUSR1)


def tracked_rows(root, csv, epochs: int) -> list:
    """Every CSV row has one completed MLflow child run under the sweep's one parent, with all
    six metrics at every epoch (the last equal to the row's), the model checkpoint and the
    reconstruction grid as artifacts, and a checkpoint the next stage loads with the row's
    settings. Returns (row, child run, loaded model) for further checks."""
    client, parents, children = mlflow_runs(root)
    assert len(parents) == 1 and len(children) == len(csv)
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    by_trial = {c.data.tags["trial_id"]: c for c in children}
    checked = []
    for row in csv.itertuples():
        child = by_trial[row.trial_id]
        assert child.info.run_id == row.mlflow_run_id
        assert child.data.tags["status"] == "completed"
        assert float(child.data.tags["beta"]) == row.beta == float(child.data.params["beta"])
        assert float(child.data.params["lr"]) == row.lr
        for name in EPOCH_METRICS:
            history = client.get_metric_history(child.info.run_id, name)
            assert sorted(m.step for m in history) == list(range(1, epochs + 1)), name
            assert math.isclose(max(history, key=lambda m: m.step).value, getattr(row, name),
                                rel_tol=1e-6)
        assert {a.path for a in client.list_artifacts(child.info.run_id)} == \
            {"model.pt", "reconstructions.png"}
        # the copied final checkpoint is a model the next stage can load
        model, config = load_model(root / row.checkpoint)
        assert (config.method, config.beta, config.epochs, config.lr) == \
            (row.method, row.beta, epochs, row.lr)
        checked.append((row, child, model))
    return checked


def test_grid_sweep_tracks_every_trial_in_mlflow_and_writes_the_table(tmp_path):
    # Optuna picks lr (every trial) and the clipping factor (Echo trials) inside the ranges.
    # checkpoint_every=1, but at most one checkpoint an hour: only the final one is written.
    params = tiny_params("grid", search={"lr": {"low": 1e-3, "high": 1e-2}, "method_options": {
                                             "echo": {"clip_factor": {"low": 0.4, "high": 0.7}}}},
                         checkpoint_min_interval_s=3600)
    table = run_sweep(params, tmp_path, verbose=0)
    trial_dirs = list((tmp_path / "ray_results" / "grid").glob("*_mlp_z4"))
    assert len(trial_dirs) == 4
    for trial_dir in trial_dirs:
        assert len(list(trial_dir.glob("checkpoint_*"))) == 1, trial_dir

    csv = pd.read_csv(tmp_path / "results/sweep.csv", keep_default_na=False)
    assert list(csv.columns) == CSV_COLUMNS
    assert sorted(csv.trial_id) == ["echo_b0.5_mlp_z4", "echo_b1_mlp_z4",
                                    "vae_b0.5_mlp_z4", "vae_b1_mlp_z4"]
    assert set(csv.status) == {"completed"} and set(csv.epochs_done) == {2}
    assert csv.lr.between(1e-3, 1e-2).all() and csv.lr.nunique() == 4
    assert csv.loc[csv.method == "vae", "clip_factor"].eq("").all()
    assert csv.loc[csv.method == "echo", "clip_factor"].astype(float).between(0.4, 0.7).all()

    client, parents, children = mlflow_runs(tmp_path)
    assert len(parents) == 1 and parents[0].info.run_name == "grid"
    for row, child, model in tracked_rows(tmp_path, csv, epochs=2):
        assert child.data.tags["method"] == row.method and child.data.tags["dataset"] == "digits"
        assert {k: child.data.params[k] for k in ("method", "arch", "latent_dim", "epochs")} == \
            {"method": row.method, "arch": "mlp", "latent_dim": "4", "epochs": "2"}
        # a method's options only on its own runs
        assert child.data.params.get("clip_factor") == (str(row.clip_factor) or None)
        if row.method == "echo":
            assert model.channel.clip_factor == float(row.clip_factor)
    assert len(table) == 4


def test_grid_search_covers_every_point_with_its_own_optuna_study(tmp_path):
    params = tiny_params("search", search={"num_samples": 3, "lr": {"low": 1e-4, "high": 1e-2},
                                           "method_options": {"echo": {
                                               "clip_factor": {"low": 0.4, "high": 0.7}}}})
    searcher = tune_config(params, tmp_path).search_alg
    configs = []
    for i in range(6):
        config = searcher.suggest(f"t{i}")
        configs.append(config)
        searcher.on_trial_complete(f"t{i}", {"status": "running", "test_neg_elbo": 50.0 - i})
    checkpoint = tmp_path / "searcher.pkl"
    searcher.save(str(checkpoint))                    # what Tune stores for a resume
    restored = tune_config(params, tmp_path).search_alg
    restored.restore(str(checkpoint))
    configs += [restored.suggest(f"t{i}") for i in range(6, 12)]
    assert restored.suggest("t12") == Searcher.FINISHED
    names = [c["trial_id"] for c in configs]
    assert len(set(names)) == 12 and names[:4] == ["echo_b0.5_mlp_z4_s0", "echo_b1_mlp_z4_s0",
                                                   "vae_b0.5_mlp_z4_s0", "vae_b1_mlp_z4_s0"]
    assert all(1e-4 <= c["lr"] <= 1e-2 for c in configs)
    assert all(0.4 <= c["clip_factor"] <= 0.7 for c in configs if c["method"] == "echo")
    assert all(c["clip_factor"] is None for c in configs if c["method"] == "vae")
    assert len({c["lr"] for c in configs}) == 12


def test_seeds_are_a_grid_dimension_with_one_trial_per_seed(tmp_path):
    params = tiny_params("seeds", seeds=[3, 7])
    searcher = tune_config(params, tmp_path).search_alg
    configs = [searcher.suggest(f"t{i}") for i in range(8)]
    assert searcher.suggest("t8") == Searcher.FINISHED
    names = [c["trial_id"] for c in configs]
    assert names[:2] == ["echo_b0.5_mlp_z4_seed3", "echo_b0.5_mlp_z4_seed7"]
    assert len(set(names)) == 8
    assert {(c["method"], c["beta"], c["seed"]) for c in configs} == {
        (m, b, s) for m in ("echo", "vae") for b in (0.5, 1.0) for s in (3, 7)}
    assert train_config(configs[1]).seed == 7
    # One seed: the names (and so resumable experiments) stay as before seeds existed.
    single = tune_config(tiny_params("one", seeds=[5]), tmp_path).search_alg.suggest("t0")
    assert single["trial_id"] == "echo_b0.5_mlp_z4" and single["seed"] == 5
    # Replicates are seeds: repeated Optuna samples without a search range are refused.
    with pytest.raises(ValueError, match="for replicates list seeds in sweep.seeds"):
        tiny_params("x", search={"num_samples": 2})


def test_asha_stops_only_worse_samples_of_the_same_grid_point():
    from types import SimpleNamespace
    scheduler = GridPointASHA(metric="test_loss", mode="min", max_t=8, grace_period=1)

    def trial(name, method, beta):
        made = SimpleNamespace(trial_id=name, config={"method": method, "beta": beta,
                                                      "arch": "mlp", "latent_dim": 4})
        scheduler.on_trial_add(None, made)
        return made

    good, worse = trial("a", "echo", 1.0), trial("b", "echo", 1.0)
    other_point = trial("c", "vae", 3.0)
    first = {"training_iteration": 1}
    assert scheduler.on_trial_result(None, good, {**first, "test_loss": 10.0}) == "CONTINUE"
    assert scheduler.on_trial_result(None, worse, {**first, "test_loss": 20.0}) == "STOP"
    # far worse than both, but alone at its grid point: an R-D point is never dropped
    assert scheduler.on_trial_result(None, other_point, {**first, "test_loss": 100.0}) == "CONTINUE"


def test_changed_settings_start_a_new_experiment_and_keep_the_old_one(tmp_path):
    base = fingerprint(tiny_params("x"))
    assert fingerprint(tiny_params("x", max_concurrent=1, resources={"cpu": 2})) == base
    assert fingerprint(tiny_params("x", checkpoint_min_interval_s=5,
                                   train={"cuda_graph": False})) == base
    assert fingerprint(tiny_params("x", betas=[2.0])) != base
    prepared = tmp_path / "data/prepared/digits.npz"      # new data from the prepare stage
    prepared.parent.mkdir(parents=True)
    prepared.write_bytes(b"first version")
    first = fingerprint(tiny_params("x"), tmp_path)
    prepared.write_bytes(b"second version")
    assert first != fingerprint(tiny_params("x"), tmp_path) != base
    experiment = str(tmp_path / "ray_results" / "x")
    uid, resumable = experiment_uid(experiment, base)
    assert not resumable and experiment_uid(experiment, base) == (uid, True)
    other, resumable = experiment_uid(experiment, fingerprint(tiny_params("x", betas=[2.0])))
    assert not resumable and other != uid
    assert (tmp_path / "ray_results" / f"x@{uid[:8]}" / "echo_sweep.json").exists()


def test_interrupted_sweep_resumes_without_retraining_finished_trials(tmp_path):
    params = tiny_params("resume", methods=["vae"], betas=[0.25, 0.5, 1.0], train={"epochs": 3})
    first = InterruptAfterFirstTrial()
    with pytest.raises(SweepInterrupted, match="run the stage again"):
        run_sweep(params, tmp_path, callbacks=(first,), verbose=0)
    assert not (tmp_path / "results/sweep.csv").exists()
    assert 1 <= len(first.completed) < 3

    second = EpochLog()
    run_sweep(params, tmp_path, callbacks=(second,), verbose=0)
    retrained = {trial for trial, _ in second.epochs}
    assert retrained.isdisjoint(first.completed)            # finished trials are not trained again
    for trial in retrained:
        before = [e for t, e in first.epochs if t == trial]
        after = sorted(e for t, e in second.epochs if t == trial)
        # An unfinished trial continues from its checkpoint (checkpoint_every=1): at most its
        # last reported epoch is trained again (its checkpoint may have been in flight).
        assert after == list(range(after[0], 4)), (trial, before, after)
        assert max(before, default=1) <= after[0] <= max(before, default=0) + 1, \
            (trial, before, after)

    csv = pd.read_csv(tmp_path / "results/sweep.csv")
    assert len(csv) == 3 and set(csv.status) == {"completed"} and set(csv.epochs_done) == {3}
    client, parents, children = mlflow_runs(tmp_path)
    assert len(parents) == 1 and len(children) == 3              # no duplicate child runs
    for child in children:
        assert child.data.tags["status"] == "completed"
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "test_neg_elbo")]
        assert sorted(steps) == [1, 2, 3]
    assert set(csv.mlflow_run_id) == {c.info.run_id for c in children}
    assert all((tmp_path / path).is_file() for path in csv.checkpoint)


def test_a_diverging_trial_is_marked_nonfinite_and_the_others_complete(tmp_path):
    # lr = 1 genuinely diverges for the Gaussian VAE (log-variances blow up) within an epoch,
    # while Echo's bounded f and S keep its loss finite.
    params = tiny_params("nan", betas=[1.0], train={"lr": 1.0})
    run_sweep(params, tmp_path, verbose=0)
    csv = pd.read_csv(tmp_path / "results/sweep.csv", keep_default_na=False).set_index("method")
    assert csv.loc["vae", "status"] == "nonfinite"
    assert "non-finite training loss" in csv.loc["vae", "error"]
    assert csv.loc["vae", "checkpoint"] == ""
    assert csv.loc["echo", "status"] == "completed" and csv.loc["echo", "epochs_done"] == 2
    _, _, children = mlflow_runs(tmp_path)
    tags = {c.data.tags["method"]: c.data.tags for c in children}
    assert tags["vae"]["status"] == "nonfinite" and "non-finite" in tags["vae"]["error"]
    assert tags["echo"]["status"] == "completed"


def test_eight_concurrent_trials_share_one_sqlite_store(tmp_path):
    params = tiny_params("eight", betas=[0.25, 0.5, 1.0, 2.0], max_concurrent=8,
                         resources={"cpu": 1}, train={"epochs": 2})
    watch = EpochLog()
    run_sweep(params, tmp_path, callbacks=(watch,), verbose=0)
    # Trials overlapped, each live trial in its own worker process (how many at a time depends
    # on how fast the workers come up; the sweep reuses actors, so a trial that ends before the
    # last worker is up hands its process to a pending trial: 6 processes for 8 trials once the
    # workers no longer imported scikit-learn).
    assert watch.most_live >= 2 and len(watch.pids) >= watch.most_live
    csv = pd.read_csv(tmp_path / "results/sweep.csv")
    assert len(csv) == 8 and set(csv.status) == {"completed"}
    client, parents, children = mlflow_runs(tmp_path)
    assert len(parents) == 1 and len(children) == 8
    for child in children:
        assert set(child.data.metrics) == set(EPOCH_METRICS)
        assert len(client.get_metric_history(child.info.run_id, "train_rate")) == 2


def test_packed_betas_train_one_trial_per_method_and_stay_per_beta_downstream(tmp_path):
    params = tiny_params("packed", pack_betas=True,
                         search={"lr": {"low": 1e-3, "high": 1e-2}})
    watch = EpochLog()
    table = run_sweep(params, tmp_path, callbacks=(watch,), verbose=0)
    assert sorted(watch.completed) == ["echo_betas_mlp_z4", "vae_betas_mlp_z4"]   # 2 trials
    assert len(list((tmp_path / "ray_results" / "packed").glob("*_mlp_z4"))) == 2

    csv = pd.read_csv(tmp_path / "results/sweep.csv", keep_default_na=False)
    assert list(csv.columns) == CSV_COLUMNS and len(table) == 4
    assert sorted(csv.trial_id) == ["echo_b0.5_mlp_z4", "echo_b1_mlp_z4",
                                    "vae_b0.5_mlp_z4", "vae_b1_mlp_z4"]
    assert set(csv.status) == {"completed"} and set(csv.epochs_done) == {2}
    # the betas of a method share their trial's Optuna lr; the two methods' studies differ
    assert csv.groupby("method").lr.nunique().eq(1).all() and csv.lr.nunique() == 2
    # members differ (own beta), so their metrics do too
    assert csv.groupby("method").test_rate.nunique().eq(2).all()

    tracked_rows(tmp_path, csv, epochs=2)


def test_a_diverging_member_stops_alone_and_its_packed_trial_goes_on(tmp_path):
    # beta = 1e39 is inf in float32: that member's loss is inf from its first step, for both
    # methods; the beta-1 members of the same ensembles train on to the end (issue 15).
    run_sweep(tiny_params("packed_nan", pack_betas=True, betas=[1.0, 1e39]), tmp_path, verbose=0)
    csv = pd.read_csv(tmp_path / "results/sweep.csv", keep_default_na=False)
    diverged, healthy = csv[csv.beta > 1e30], csv[csv.beta == 1.0]
    assert len(diverged) == 2 and set(diverged.status) == {"nonfinite"}
    assert set(diverged.checkpoint) == {""}
    assert diverged.error.str.contains("non-finite training loss at epoch 1").all()
    assert set(healthy.status) == {"completed"} and set(healthy.epochs_done) == {2}
    assert all((tmp_path / path).exists() for path in healthy.checkpoint)
    assert (healthy.test_neg_elbo.astype(float) > 0).all()
    _, _, children = mlflow_runs(tmp_path)
    assert sorted(c.data.tags["status"] for c in children) == ["completed"] * 2 + ["nonfinite"] * 2
    # The stopped member's child run has no epochs after it stopped.
    for c in children:
        if c.data.tags["status"] == "nonfinite":
            assert "test_neg_elbo" not in c.data.metrics


def test_packed_betas_change_the_fingerprint_and_refuse_asha():
    assert fingerprint(tiny_params("x", pack_betas=True)) != fingerprint(tiny_params("x"))
    assert fingerprint(tiny_params("x", pack_betas=False)) == fingerprint(tiny_params("x"))
    with pytest.raises(ValueError, match=r"sweep\.pack_betas.*sweep\.asha"):
        tiny_params("x", pack_betas=True, asha=True)


@pytest.mark.parametrize("sweep, field", [
    ("betas: [0.0, 1.0]", "sweep.betas"),
    ("methodz: [echo]", "sweep.methodz"),
    ("search: {method_options: {echo: {clip_factor: {low: 0.5, high: 0.99}}}}",
     "sweep.search.method_options.echo.clip_factor.high"),
    ("search: {metric: test_elbo}", "sweep.search.metric"),
    ("betas: [1.0, 1.0]", "sweep.betas"),
    ("pack_betas: true\n  asha: true", "sweep.pack_betas and sweep.asha"),
])
def test_invalid_params_fail_before_anything_starts(tmp_path, capsys, monkeypatch, sweep, field):
    (tmp_path / "params.yaml").write_text(f"data: {{dataset: digits}}\nsweep:\n  {sweep}\n")
    monkeypatch.chdir(tmp_path)
    assert stage_main(["--params", "params.yaml"]) == 2
    err = capsys.readouterr().err
    assert field in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "ray_results").exists() and not (tmp_path / "mlflow.db").exists()


def test_missing_data_fails_before_ray_starts_naming_the_field(tmp_path):
    params = Params.model_validate({"data": {"dataset": "mnist", "raw_dir": "nowhere"}})
    with pytest.raises(SweepError, match="data"):
        run_sweep(params, tmp_path, verbose=0)
    assert not (tmp_path / "ray_results").exists()


def test_the_sweep_writes_its_table_and_models_where_it_is_told(tmp_path):
    """`--sweep-csv` / `--checkpoints` (dvc.yaml's cmd) move both outputs; the table's
    checkpoint column names the models where they are."""
    from dataclasses import replace

    from pipeline.stage_files import DEFAULT_FILES
    files = replace(DEFAULT_FILES, sweep_csv=Path("out/table.csv"), checkpoints=Path("models"))
    params = tiny_params("moved", methods=["vae"], betas=[1.0], train={"epochs": 1})
    table = run_sweep(params, tmp_path, files=files, verbose=0)
    assert list(table["status"]) == ["completed"]
    csv = pd.read_csv(tmp_path / "out" / "table.csv")
    assert list(csv["checkpoint"]) == ["models/vae_b1_mlp_z4.pt"]
    load_model(tmp_path / csv["checkpoint"][0])
    assert not (tmp_path / "results").exists()

