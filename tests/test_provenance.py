"""A sweep's fingerprint changes only when its trials' results would (a setting at its default, or
one declared free to change on resume, archives no stored sweep; fingerprints stored before this
rule still match), and a trial's record is its provenance: every setting and option it used,
defaults included, once each, in results/sweep.csv and in its MLflow params."""
from __future__ import annotations

import json

import pytest

from echo.methods import method_options
from echo.metrics import EPOCH_METRICS
from echo.settings import TrainConfig, provenance_settings, resume_free_settings
from pipeline.config import Params
from pipeline.sweep.experiment import experiment_uid, fingerprint, same_settings
from pipeline.records import CSV_COLUMNS, SETTING_COLUMNS
from pipeline.sweep.trials import csv_row, trial_provenance
from support.params import as_params, tiny_params


def params(train=None, **sweep) -> Params:
    top = {key: sweep.pop(key) for key in ("method_options", "dataset_method_options")
           if key in sweep}
    return as_params(tiny_params("p", run=False, train=train or {},
                                 sweep={"methods": ["echo", "vae"], **sweep}, **top))


def fingerprint_before_this_change(p: Params) -> dict:
    """What pipeline.sweep.experiment.fingerprint stored before settings declared themselves: hand-kept
    lists, every train: value written out, params.options of any method."""
    sweep = p.sweep.model_dump(include={"methods", "betas", "archs", "latent_dims", "seeds",
                                        "search", "asha", "train_limit", "test_limit"})
    if p.sweep.pack_betas:
        sweep["pack_betas"] = True
    return {"data": {**p.data.model_dump(exclude={"download", "check_sizes"}),
                     "prepared_sha256": None},
            "train": p.train.model_dump(exclude={"device", "cuda_graph", "grad_clip"} | {
                n for n in ("likelihood", "gaussian_tau") if getattr(p.train, n) is None}),
            "method_options": p.options, "sweep": sweep}


def same(a: Params, b: Params) -> bool:
    return same_settings(json.loads(json.dumps(fingerprint(a))), fingerprint(b))


def test_only_a_change_of_results_changes_the_fingerprint():
    base = params()
    # Defaults written out, and every setting declared free to change on resume.
    assert same(base, params(train={"grad_clip": None, "lr": 3e-4, "beta_warmup_steps": 500}))
    assert same(base, params(method_options={"echo": {"d_max": None, "replace": False}}))
    assert same(base, params(train={"device": "cpu", "cuda_graph": False},
                             max_concurrent=1, resources={"cpu": 2}, checkpoint_every=3,
                             checkpoint_min_interval_s=0, max_failures=0, pack_betas=False))
    # Options of a method the sweep does not train.
    assert same(base, params(method_options={"vae-vamp": {"n_pseudo": 9}}))
    # What the trials are.
    for other in (params(train={"grad_clip": 5.0}), params(train={"lr": 1e-3}),
                  params(betas=[2.0]), params(pack_betas=True),
                  params(method_options={"echo": {"d_max": 20}}),
                  params(search={"lr": {"low": 1e-4, "high": 1e-3}})):
        assert not same(base, other)
    assert {"device", "cuda_graph", "compile", "data_root", "prepared", "out", "progress"} == \
        set(resume_free_settings())


def test_a_fingerprint_stored_before_declarations_still_resumes(tmp_path):
    for p in (params(), params(train={"lr": 1e-3}, pack_betas=True,
                               method_options={"echo": {"d_max": 20},
                                               "vae-vamp": {"n_pseudo": 9}}),
              params(train={"likelihood": "bernoulli"}, seeds=[0, 1])):
        stored = json.loads(json.dumps(fingerprint_before_this_change(p)))
        assert same_settings(stored, fingerprint(p))
        assert not same_settings(stored, fingerprint(params(betas=[3.0])))
    # Through the experiment folder: the old echo_sweep.json is resumed, not archived.
    experiment = tmp_path / "ray_results" / "p"
    experiment.mkdir(parents=True)
    (experiment / "echo_sweep.json").write_text(json.dumps(
        {"uid": "0123456789abcdef", "settings": fingerprint_before_this_change(params())}))
    assert experiment_uid(str(experiment), fingerprint(params())) == ("0123456789abcdef", True)
    # A value stored in full at what was then the default, which is no longer: other trials.
    stored = fingerprint(params())
    stored["train"]["beta_warmup_steps"] = 250
    assert not same_settings(stored, fingerprint(params()))


def trial(method: str, **extra) -> dict:
    """A trial config as the searcher makes it (trial_base + grid point + options)."""
    base = {**params().train.model_dump(), "dataset": "digits", "prepared": "/abs/digits.npz",
            "data_root": "/abs/raw", "seed": 0, "train_limit": None, "test_limit": None,
            "checkpoint_every": 5, "checkpoint_min_interval_s": 30}
    return {**base, "method": method, "beta": 0.5, "arch": "mlp", "latent_dim": 4,
            "trial_id": f"{method}_b0.5_mlp_z4", "options": {}, "clip_factor": None, **extra}


def test_a_trials_row_and_params_are_every_setting_and_option_it_used_once():
    from pipeline.sweep.runs import trial_params
    assert len(set(CSV_COLUMNS)) == len(CSV_COLUMNS)
    config = trial("echo", options={"clip_factor": 0.7}, lr=0.002)
    record = {"epoch": 2, **{name: 1.0 for name in EPOCH_METRICS}, "epoch_lr": 0.0}
    row = csv_row(config, record, "completed", "", "x.pt")
    provenance = trial_provenance(config)
    # Every training setting (defaults included: grad_clip off, the warm-up), nothing local
    # (paths), Echo's options with the values used (d_max: what its rule picks for None, the
    # batch's other examples), no other method's.
    assert set(provenance) == {*provenance_settings(), *method_options("echo")}
    assert provenance["grad_clip"] is None and provenance["beta_warmup_steps"] == 500
    assert (provenance["clip_factor"], provenance["d_max"], provenance["f_range"]) == \
        (0.7, config["batch_size"] - 1, 1.0)
    assert not {"data_root", "prepared", "out", "progress", "options"} & set(row)
    assert {k: row[k] for k in provenance} == provenance
    # The record's schedule lr does not overwrite the trial's lr setting.
    assert row["lr"] == 0.002 and row["epoch_lr"] == 0.0 and row["epochs_done"] == 2
    assert trial_params(config) == provenance
    vamp = trial_provenance(trial("vae-vamp", options={"n_pseudo": 9}))
    assert vamp["n_pseudo"] == 9 and "clip_factor" not in vamp
    assert set(SETTING_COLUMNS) >= set(vamp) | set(provenance)


def test_mlflow_is_backfilled_with_the_library_record_of_an_old_checkpoint(tmp_path):
    import torch

    from pipeline.sweep.runs import SweepRuns

    class Client:                          # the two MlflowClient calls complete_history makes
        logged = []

        def get_metric_history(self, run_id, key):
            return []

        def log_batch(self, run_id, metrics=()):
            self.logged += list(metrics)

    old = {"epoch": 1, "lr": 3e-4, "epoch_seconds": 1.0, "train_rate": 2.0,
           "train_distortion": 10.0, "train_neg_elbo": 12.0, "test_rate": 3.0,
           "test_distortion": 11.0, "test_neg_elbo": 14.0}
    torch.save({"config": {"beta": 0.5}, "history": [old], "epoch": 1}, tmp_path / "model.pt")
    runs = SweepRuns("sqlite:///x.db", "e", "s", "u", artifact_root=tmp_path)
    runs.client = Client()
    assert runs.complete_history("run", tmp_path / "model.pt") == 1
    logged = {m.key: m.value for m in runs.client.logged}
    assert set(logged) == set(EPOCH_METRICS)
    assert logged["test_loss"] == pytest.approx(11.0 + 0.5 * 3.0) and logged["epoch_lr"] == 3e-4


def test_a_sweep_csv_written_before_the_provenance_columns_still_evaluates(tmp_path):
    from pipeline.results.evaluation import SWEEP_COLUMNS, read_sweep
    old = ("trial_id,method,dataset,arch,latent_dim,beta,seed,lr,clip_factor,status,error,"
           "epochs_done,checkpoint,mlflow_run_id,train_rate,train_distortion,train_neg_elbo,"
           "test_rate,test_distortion,test_neg_elbo\n"
           "vae_b1_mlp_z4,vae,digits,mlp,4,1.0,0,0.003,,failed,boom,0,,,,,,,,\n")
    (tmp_path / "sweep.csv").write_text(old)
    table = read_sweep(tmp_path / "sweep.csv")
    assert set(SWEEP_COLUMNS) <= set(table.columns) and table.loc[0, "lr"] == 0.003
    assert table["grad_clip"].isna().all()
