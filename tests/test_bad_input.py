"""Bad input reaches the real entry points and is refused there: every field of params.yaml with a
wrong type or an out-of-range value, given to each stage, exits non-zero with a one-line error
that names the field and writes nothing; the cases users hit most (negative beta, a clipping
factor that breaks the truncation bound, d_max not below the batch, unknown method or data set,
zero epochs) also through `python -m stages.<name>` in a fresh interpreter. Damaged or hostile
checkpoints are refused with an error naming the file, and never unpickle arbitrary objects.
"""
from __future__ import annotations

import ast
import builtins
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch
import yaml
from annotated_types import Ge, Gt, Le
from pydantic import BaseModel

from echo.train import TrainConfig, fit, load_checkpoint, load_model, save_checkpoint
from pipeline.config import Params
from support import REPO, child_env, snapshot

STAGES = ("prepare", "sweep", "evaluate", "frontier")     # every stage reading params.yaml


def stage_main(name: str):
    return __import__(f"stages.{name}", fromlist=["main"]).main


# ---------------------------------------------------------------------------------------------
# One bad value of each kind for every leaf field of the schema
# ---------------------------------------------------------------------------------------------


def _leaves(model=Params, prefix=()):
    for name, info in model.model_fields.items():
        annotation, args = info.annotation, typing.get_args(info.annotation)
        if type(None) in args:
            annotation = next(a for a in args if a is not type(None))
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _leaves(annotation, prefix + (name,))
        else:
            yield prefix + (name,), annotation, info.metadata


def _bad_values(annotation, metadata) -> list[tuple[str, object]]:
    """(kind, value): a wrong type always, and the nearest out-of-range value where bounded."""
    wrong = {int: "many", float: "fast", bool: "maybe", str: [1, 2]}
    if annotation in wrong:
        values = [("wrong_type", wrong[annotation])]
    elif typing.get_origin(annotation) is list:
        values = [("wrong_type", "not-a-list")]
    elif typing.get_origin(annotation) is dict:
        values = [("wrong_type", "not-a-mapping")]
    else:
        raise AssertionError(f"no bad value for {annotation!r}")
    for bound in metadata:
        if isinstance(bound, Ge):
            values.append(("below_range", bound.ge - 1))
        elif isinstance(bound, Gt):
            values.append(("below_range", bound.gt))
        elif isinstance(bound, Le):
            values.append(("above_range", bound.le + 1))
    return values


def _case(path: tuple[str, ...], value) -> dict:
    raw: dict = {}
    node = raw
    for key in path[:-1]:
        node = node.setdefault(key, {})
    if path[-2:-1] == ("lr",):                          # a Range: the other bound valid
        node.update({"low": 0.1, "high": 0.5})
    node[path[-1]] = value
    return raw


FIELD_CASES = [pytest.param(".".join(path), _case(path, value),
                            id=f"{'.'.join(path)}-{kind}")
               for path, annotation, metadata in _leaves()
               for kind, value in _bad_values(annotation, metadata)]

# The paper-level rules a typo most often breaks (field named in the message -> params).
NAMED_CASES = {
    "negative_beta": ("sweep.betas", {"sweep": {"betas": [0.5, -1.0]}}),
    "clip_factor_breaks_truncation_bound": (
        "sweep.search.method_options.echo.clip_factor",
        {"sweep": {"search": {"method_options": {"echo": {"clip_factor": {"low": 0.5,
                                                                          "high": 0.95}}}}}}),
    "d_max_not_below_batch": ("method_options.echo.d_max",
                              {"train": {"batch_size": 50}, "method_options": {"echo": {"d_max": 50}}}),
    # Per-method options (issue 15): unknown option, wrong kind, an option that cannot be
    # searched, an unknown method, and the keys that moved there.
    "unknown_method_option": ("method_options.vae-vamp.n_pseudos",
                              {"method_options": {"vae-vamp": {"n_pseudos": 500}}}),
    "method_option_wrong_kind": ("vae-vamp.n_pseudo",
                                 {"method_options": {"vae-vamp": {"n_pseudo": "many"}}}),
    "option_not_tunable": ("sweep.search.method_options",
                           {"sweep": {"search": {"method_options": {
                               "vae-vamp": {"n_pseudo": {"low": 10, "high": 20}}}}}}),
    "options_of_unknown_method": ("method_options", {"method_options": {"vea": {"x": 1}}}),
    "d_max_moved": ("method_options: {echo: {d_max", {"train": {"d_max": 50}}),
    "clip_factor_moved": ("sweep.search.method_options.echo.clip_factor",
                          {"sweep": {"search": {"clip_factor": {"low": 0.5, "high": 0.6}}}}),
    "unknown_method": ("sweep.methods", {"sweep": {"methods": ["echo", "vea"]}}),
    "unknown_dataset": ("data.dataset", {"data": {"dataset": "mnsit"}}),
    "zero_epochs": ("train.epochs", {"train": {"epochs": 0}}),
    "wrong_type_lr": ("train.lr", {"train": {"lr": "fast"}}),
    "boolean_as_number": ("train.epochs", {"train": {"epochs": True}}),
    "unknown_key": ("train.epoch", {"train": {"epoch": 3}}),
    # Values the schema used to accept that fail only after start-up (issue 17, cases 4, 7).
    "sweep_name_is_a_path": ("sweep.name", {"sweep": {"name": "../data"}}),
    "empty_sweep_name": ("sweep.name", {"sweep": {"name": ""}}),
    "empty_tracking_experiment": ("tracking.experiment", {"tracking": {"experiment": ""}}),
    "unknown_tracking_scheme": ("tracking.uri", {"tracking": {"uri": "sqlit:///mlflow.db"}}),
    "epochs_1e20": ("train.epochs", {"train": {"epochs": 1e20}}),
    "unknown_device": ("train.device", {"train": {"device": "gpu"}}),
}


def assert_one_line_naming(stderr: str, field: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got {lines}"
    assert lines[0].startswith("error: ") and field in lines[0], lines[0]


def test_every_field_has_cases():
    named = {case.values[0] for case in FIELD_CASES}
    assert {"train.epochs", "train.lr", "sweep.betas", "data.dataset", "train.beta_warmup_steps",
            "sweep.search.lr.high", "method_options", "sweep.search.method_options",
            "frontier.recon_samples"} <= named
    assert len(FIELD_CASES) > 2 * len(Params.model_fields)


@pytest.mark.parametrize("stage", STAGES)
def test_every_bad_field_stops_every_stage(stage, tmp_path, monkeypatch, capsys):
    """In-process main() (what `python -m stages.<stage>` runs) over all field cases: exit 2, one
    line naming the field, and the working directory untouched."""
    main = stage_main(stage)
    monkeypatch.chdir(tmp_path)
    for field, raw in [case.values for case in FIELD_CASES] + list(NAMED_CASES.values()):
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
        before = snapshot(tmp_path)
        code = main(["--params", "bad.yaml"])
        captured = capsys.readouterr()
        assert code == 2, (field, raw, captured.err)
        assert_one_line_naming(captured.err, field)
        assert snapshot(tmp_path) == before, f"{stage} wrote files for a bad {field}"


CLI_CASES = [("prepare", "unknown_dataset"), ("sweep", "negative_beta"),
             ("sweep", "clip_factor_breaks_truncation_bound"), ("sweep", "d_max_not_below_batch"),
             ("evaluate", "unknown_method"), ("frontier", "zero_epochs"),
             ("sweep", "sweep_name_is_a_path")]


def test_named_bad_params_through_the_real_cli(tmp_path):
    """Fresh interpreters running the stages as DVC does (started together: they only import
    and validate): non-zero exit, one line naming the field, nothing written."""
    env = child_env()
    runs = []
    for stage, case in CLI_CASES:
        folder = tmp_path / f"{stage}-{case}"
        folder.mkdir()
        (folder / "bad.yaml").write_text(yaml.safe_dump(NAMED_CASES[case][1]))
        runs.append((stage, case, folder, subprocess.Popen(
            [sys.executable, "-m", f"stages.{stage}", "--params", "bad.yaml"], cwd=folder,
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    try:
        for stage, case, folder, proc in runs:
            _, stderr = proc.communicate(timeout=300)
            assert proc.returncode == 2, (stage, case, stderr)
            assert_one_line_naming(stderr, NAMED_CASES[case][0])
            assert snapshot(folder) == {"bad.yaml"}, (stage, case)
    finally:
        for *_, proc in runs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# The CLI of the library refuses what params.yaml refuses, with the same rule and message.
TRAIN_CLI_CASES = {
    "clip_factor_above_the_bound": (["--option", "clip_factor=0.99"],
                                    {"sweep": {"search": {"method_options": {"echo": {
                                        "clip_factor": {"low": 0.5, "high": 0.99}}}}}}),
    "d_max_not_below_batch": (["--option", "d_max=500"],
                              {"method_options": {"echo": {"d_max": 500}}}),
}
CLI_NAMES = {"--option d_max": "method_options.echo.d_max", "--batch-size": "train.batch_size",
             "--option clip_factor": "sweep.search.method_options.echo.clip_factor.high"}


@pytest.mark.parametrize("case", sorted(TRAIN_CLI_CASES))
def test_train_cli_refuses_what_params_yaml_refuses(case, tmp_path, monkeypatch, capsys):
    """`python -m echo.train` (its main, in-process) with a value params.yaml refuses: exit 2
    before training, one line, the message of params.yaml's with the CLI's names."""
    from echo.train import main as train_main
    from pipeline.config import ParamsError, load_params

    args, raw = TRAIN_CLI_CASES[case]
    monkeypatch.chdir(tmp_path)
    code = train_main(["--method", "echo", "--dataset", "digits", "--arch", "mlp",
                       "--epochs", "1", "--no-progress", *args])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    assert snapshot(tmp_path) == set()
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError) as info:
        load_params(tmp_path / "bad.yaml")
    message = lines[0][len("error: "):]
    for cli, field in CLI_NAMES.items():
        message = message.replace(cli, field)
    assert message in str(info.value), (message, str(info.value))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_train_cli_without_cuda_refuses_device_cuda(tmp_path, monkeypatch, capsys):
    from echo.train import main as train_main

    monkeypatch.chdir(tmp_path)
    code = train_main(["--dataset", "digits", "--arch", "mlp", "--epochs", "1",
                       "--no-progress", "--device", "cuda"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "--device cuda" in lines[0] and "CUDA" in lines[0]
    assert snapshot(tmp_path) == set()


def test_missing_params_file_names_the_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for stage in STAGES:
        assert stage_main(stage)(["--params", "nowhere.yaml"]) == 2
        assert_one_line_naming(capsys.readouterr().err, "nowhere.yaml")
    assert snapshot(tmp_path) == set()


# ---------------------------------------------------------------------------------------------
# Checkpoints: damaged files, and pickles that would run code
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory) -> Path:
    """A real checkpoint written by `fit` (1 epoch, tiny)."""
    out = tmp_path_factory.mktemp("good")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fit(TrainConfig(method="echo", dataset="digits", arch="mlp", latent_dim=2, epochs=1,
                        batch_size=50, train_limit=100, test_limit=50, device="cpu",
                        progress=False, out=str(out)))
    finally:
        torch.set_num_threads(threads)
    return out / "checkpoint.pt"


def _damage(kind: str, good: bytes) -> bytes:
    return {"truncated": good[: len(good) // 2],
            "empty": b"",
            "random_bytes": os.urandom(4096),
            "zeroed_middle": good[:200] + bytes(len(good) - 400) + good[-200:],
            "text": b"this is not a checkpoint\n"}[kind]


@pytest.mark.xdist_group("good_checkpoint")      # the module's checkpoint, written once
@pytest.mark.parametrize("kind", ["truncated", "empty", "random_bytes", "zeroed_middle", "text"])
@pytest.mark.parametrize("loader", [load_checkpoint, load_model], ids=["load_checkpoint",
                                                                       "load_model"])
def test_corrupt_checkpoint_is_refused_naming_the_file(good_checkpoint, tmp_path, kind, loader):
    assert load_checkpoint(good_checkpoint)["epoch"] == 1          # the undamaged file loads
    bad = tmp_path / f"{kind}.pt"
    bad.write_bytes(_damage(kind, good_checkpoint.read_bytes()))
    with pytest.raises(ValueError) as info:
        loader(bad)
    message = str(info.value)
    assert str(bad) in message
    assert "\n" not in message, f"not one line: {message!r}"


def test_missing_checkpoint_names_the_file(tmp_path):
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        load_checkpoint(tmp_path / "gone.pt")
    assert str(tmp_path / "gone.pt") in str(info.value)


class _RunsCode:
    """Unpickling this calls open(marker, "w"): stands for any code a hostile pickle runs."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


@pytest.mark.xdist_group("good_checkpoint")
@pytest.mark.parametrize("loader", [load_checkpoint, load_model], ids=["load_checkpoint",
                                                                       "load_model"])
def test_checkpoint_with_a_pickled_object_is_refused(good_checkpoint, tmp_path, loader):
    """weights_only=True in practice: the payload is refused and its code never runs."""
    state = load_checkpoint(good_checkpoint)
    state["history"] = [{"note": _RunsCode(tmp_path / "ran")}]
    hostile = tmp_path / "hostile.pt"
    torch.save(state, hostile)
    # Control: an unrestricted load does run the payload, so the assertion below can fail.
    torch.load(hostile, weights_only=False)
    assert (tmp_path / "ran").exists()
    (tmp_path / "ran").unlink()

    with pytest.raises(ValueError) as info:
        loader(hostile)
    assert str(hostile) in str(info.value)
    assert not (tmp_path / "ran").exists(), "the pickled payload ran"


def _torch_load_calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr == "load" and isinstance(node.func.value, ast.Name) \
                and node.func.value.id == "torch":
            yield node


def test_every_torch_load_in_the_project_is_weights_only():
    """Complements the behavioural test above for load sites added later (stages, benchmarks):
    each `torch.load(...)` call passes weights_only=True literally."""
    offenders, seen = [], 0
    for folder in ("echo", "pipeline", "stages", "benchmarks"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for call in _torch_load_calls(ast.parse(path.read_text(), str(path))):
                seen += 1
                flag = next((k.value for k in call.keywords if k.arg == "weights_only"), None)
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    offenders.append(f"{path.relative_to(REPO)}:{call.lineno}")
    assert seen >= 1                   # echo.train.load_checkpoint at least
    assert not offenders, f"torch.load without weights_only=True: {offenders}"


@pytest.mark.xdist_group("good_checkpoint")
def test_checkpoint_save_is_atomic_when_interrupted(good_checkpoint, tmp_path, monkeypatch):
    """A crash while writing a checkpoint leaves the previous one intact (write tmp, replace)."""
    target = tmp_path / "checkpoint.pt"
    target.write_bytes(good_checkpoint.read_bytes())

    def crash(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"half a checkp")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        save_checkpoint(target, {"epoch": 2})
    monkeypatch.undo()
    assert load_checkpoint(target)["epoch"] == 1
