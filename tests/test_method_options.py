"""Per-method options and training settings from params.yaml reach every trial's model, through
the one definition of each (issue 15): method options from the builders' keywords, training
settings from TrainConfig's fields."""
from __future__ import annotations

import dataclasses
import typing

import pytest

from echo import clip_factor, method_options
from echo.methods import tunable_options
from echo.settings import TrainConfig, default_of, sweep_wide_settings
from echo.train import load_model, make_model
from pipeline.config import Params, TrainParams
from pipeline.sweep.search import search_space
from pipeline.sweep.trainable import train_config
from pipeline.records import OPTION_COLUMNS, SETTING_COLUMNS
from pipeline.sweep.trials import csv_row, grid_points
from support.params import as_params, tiny_params


def params(**raw) -> Params:
    return as_params(tiny_params("opts", run=False, **{
        **raw, "train": {"epochs": 1, **raw.get("train", {})},
        "sweep": {"methods": ["echo", "vae-vamp", "vae"], "betas": [1.0], **raw.get("sweep", {})}}))


def trial_configs(p: Params, tmp_path) -> list[dict]:
    from pipeline.sweep.run import tune_config
    searcher = tune_config(p, tmp_path).search_alg
    return [searcher.suggest(f"t{i}") for i in range(len(grid_points(p)))]


def test_method_options_from_params_reach_each_trials_model(tmp_path):
    p = params(method_options={"vae-vamp": {"n_pseudo": 7}, "echo": {"d_max": 20}},
               dataset_method_options={"digits": {"vae-vamp": {"n_pseudo": 9}},
                                       "omniglot": {"vae-vamp": {"n_pseudo": 500}}})
    models = {}
    for config in trial_configs(p, tmp_path):
        cfg = train_config(config)
        models[cfg.method] = make_model(cfg, (1, 8, 8))
    # digits' own value wins over method_options; Omniglot's does not apply here.
    assert models["vae-vamp"].marginal.pseudo_logits.shape[0] == 9
    assert models["echo"].channel.d_max == 20
    assert models["echo"].channel.clip_factor == clip_factor(20)
    # Without d_max, Echo's clipping factor follows the run's batch (from_run): 49 terms at 50.
    echo_trial = next(c for c in trial_configs(params(), tmp_path) if c["method"] == "echo")
    assert make_model(train_config(echo_trial), (1, 8, 8)).channel.clip_factor == clip_factor(49)
    # The record of a trial (its sweep.csv row, its MLflow params) holds the values its model
    # used, also those Echo's rules chose: 49 terms and their clipping factor, not "none".
    row = csv_row(echo_trial, {}, "completed", "", "")
    assert (row["d_max"], row["clip_factor"]) == (49, clip_factor(49))
    given = csv_row(next(c for c in trial_configs(p, tmp_path) if c["method"] == "echo"), {},
                    "completed", "", "")
    assert (given["d_max"], given["clip_factor"]) == (20, clip_factor(20))
    assert not hasattr(models["vae"].channel, "d_max")       # options stay with their method
    # The options are part of the sweep's identity: another value is another sweep.
    from pipeline.sweep.experiment import fingerprint
    assert fingerprint(p) != fingerprint(params(method_options={"vae-vamp": {"n_pseudo": 8}}))


def test_a_search_range_is_searched_for_its_method_only(tmp_path):
    p = params(sweep={"search": {"num_samples": 2,
                                 "method_options": {"echo": {"clip_factor": {"low": 0.4,
                                                                             "high": 0.6}}}}})
    assert set(search_space(p, "echo")) == {"clip_factor"} and search_space(p, "vae") == {}
    configs = trial_configs(p, tmp_path)
    for config in configs:
        cfg = train_config(config)
        if cfg.method == "echo":
            assert 0.4 <= cfg.method_options["clip_factor"] <= 0.6
            assert make_model(cfg, (1, 8, 8)).channel.clip_factor == cfg.method_options["clip_factor"]
        else:
            assert "clip_factor" not in cfg.method_options
        # A trial's row carries its own method's options only (sweep.csv's column of another
        # method's option is left empty for it; pipeline.records.SETTING_COLUMNS has them all).
        row = csv_row(config, {}, "completed", "", "")
        assert set(OPTION_COLUMNS) <= set(SETTING_COLUMNS)
        if cfg.method == "echo":
            assert row["clip_factor"] == cfg.method_options["clip_factor"]
        else:
            assert "clip_factor" not in row


def test_options_are_what_the_builders_declare():
    assert method_options("vae-vamp") == {"n_pseudo": 250}
    assert set(method_options("echo")) == {"clip_factor", "d_max", "replace", "f_range"}  # batch_size: run
    assert tunable_options("echo") == ("clip_factor",) and tunable_options("vae") == ()
    assert OPTION_COLUMNS == ("clip_factor",)


def test_params_train_section_is_trainconfigs_sweep_wide_fields():
    """One default per setting: the schema's fields, types, defaults and bounds are
    TrainConfig's; a trial's TrainConfig takes every one of them from params.yaml."""
    hints = typing.get_type_hints(TrainConfig)
    assert set(TrainParams.model_fields) == {f.name for f in sweep_wide_settings()}
    for f in sweep_wide_settings():
        field = TrainParams.model_fields[f.name]
        assert field.default == default_of(f) and field.annotation == hints[f.name]
    p = params(train={"epochs": 3, "batch_size": 40, "lr": 0.002, "lr_decay_start": 0.25,
                      "beta_warmup_steps": 7, "device": "cpu", "cuda_graph": False})
    from pipeline.sweep.trainable import trial_base
    cfg = train_config({**trial_base(p, __import__("pathlib").Path(".")), **grid_points(p)[0]})
    for name, value in p.train.model_dump().items():
        assert getattr(cfg, name) == value


def test_every_trainconfig_field_is_a_command_line_flag(capsys):
    from echo.train import main
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for f in dataclasses.fields(TrainConfig):
        flag = {"method_options": "--option"}.get(f.name, "--" + f.name.replace("_", "-"))
        if isinstance(default_of(f), bool) and default_of(f):
            flag = "--no-" + f.name.replace("_", "-")
        assert flag in text, f"{f.name}: no {flag} in python -m echo.train --help"


def test_the_cli_builds_the_config_it_is_given(tmp_path):
    from echo.train import main
    out = tmp_path / "run"
    code = main(["--method", "vae-vamp", "--dataset", "digits", "--arch", "mlp", "--latent-dim",
                 "3", "--epochs", "1", "--batch-size", "40", "--lr-decay-start", "0.25",
                 "--train-limit", "200", "--test-limit", "80", "--option", "n_pseudo=6",
                 "--no-progress", "--out", str(out)])
    assert code == 0
    model, config = load_model(out / "checkpoint.pt")
    assert (config.batch_size, config.lr_decay_start, config.method_options) == \
        (40, 0.25, {"n_pseudo": 6})
    assert model.marginal.pseudo_logits.shape[0] == 6
