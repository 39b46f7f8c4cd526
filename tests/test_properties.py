"""Property-based tests (hypothesis) for the two gates bad input must not pass:

* the params.yaml schema (`pipeline.config.load_params`): any field given a wrong type or a value
  outside its range is refused with a one-line `ParamsError` that names the field;
* `echo.echo_sample`'s input validation: any shapes / d_max / replace / non-finite values give
  either a valid [B, D] sample or a `ValueError`, never another exception or a wrong shape.

The fields are enumerated from the pydantic models themselves, so a field added to the schema
later is covered without editing this file.
"""
from __future__ import annotations

import types
import typing
from pathlib import Path

import pytest
import torch
from annotated_types import Ge, Gt, Le, Lt
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from echo import METHODS, clip_factor, echo_sample
from echo.data import DATASETS
from pipeline.config import Params, ParamsError, load_params
from support.params import write_params

PROPERTY_SETTINGS = settings(max_examples=60, deadline=None,
                             suppress_health_check=[HealthCheck.function_scoped_fixture])

# ---------------------------------------------------------------------------------------------
# The schema's leaf fields, walked from the models
# ---------------------------------------------------------------------------------------------


def _strip_optional(annotation):
    """(inner annotation, optional?) for `X | None`."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def _is_model(annotation) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def leaf_fields(model=Params, prefix=()):
    """(path, annotation, optional, metadata) of every scalar/list field of the schema; fields of
    a nested model that is optional (e.g. sweep.search.lr: Range | None) are included too."""
    out = []
    for name, info in model.model_fields.items():
        annotation, optional = _strip_optional(info.annotation)
        path = prefix + (name,)
        if _is_model(annotation):
            out.extend(leaf_fields(annotation, path))
        else:
            out.append((path, annotation, optional, info.metadata))
    return out


LEAVES = leaf_fields()
LEAF_PATHS = [".".join(p) for p, *_ in LEAVES]

# Strings over these letters are never numbers, booleans ('yes', 'on', 't'...), 'inf'/'nan',
# data set or method names, so no lax coercion can turn them into a valid value.
NONSENSE = st.text(alphabet="ghjkmpqvwxz", min_size=1, max_size=8)
CONTAINERS = st.one_of(st.dictionaries(NONSENSE, st.integers(), min_size=1, max_size=2),
                       st.lists(st.integers(), min_size=1, max_size=2).map(lambda v: [v]))
NON_FINITE = st.sampled_from([float("inf"), float("-inf"), float("nan")])


def wrong_type(annotation, optional: bool):
    """Values that are not of `annotation` under any coercion pydantic applies."""
    choices = [CONTAINERS]
    if not optional:
        choices.append(st.none())
    origin = typing.get_origin(annotation)
    if annotation is int:
        choices += [NONSENSE, st.booleans(), NON_FINITE,
                    st.floats(-1e6, 1e6).filter(lambda v: v != int(v))]
    elif annotation is float:
        choices += [NONSENSE, st.booleans(), NON_FINITE]
    elif annotation is bool:
        choices += [NONSENSE, st.integers().filter(lambda v: v not in (0, 1)),
                    st.floats(allow_nan=False).filter(lambda v: v not in (0, 1))]
    elif annotation is str:
        choices += [st.integers(), st.floats(allow_nan=False), st.booleans()]
    elif origin is typing.Literal:
        choices += [NONSENSE, st.integers()]
    elif origin is list:
        (item,) = typing.get_args(annotation)
        choices = [st.none(), NONSENSE, st.integers(), st.dictionaries(NONSENSE, st.integers(),
                                                                       min_size=1, max_size=2),
                   wrong_type(item, optional=False).map(lambda v: [v])]
    elif origin is dict:       # method -> options: NONSENSE keys are no method's name
        choices += [NONSENSE, st.integers(), st.lists(st.integers(), min_size=1, max_size=2)]
    else:  # a new kind of field: make this test fail so that it gets a strategy
        raise AssertionError(f"no wrong-type strategy for {annotation!r}")
    return st.one_of(choices)


def out_of_range(annotation, metadata):
    """Values of the right type that violate the field's Ge/Gt/Le/Lt bounds (None if unbounded)."""
    number = st.integers if annotation is int else st.floats
    choices = []
    for bound in metadata:
        if isinstance(bound, Ge):
            choices.append(number(max_value=bound.ge - 1 if annotation is int else None)
                           .filter(lambda v, b=bound.ge: v < b))
        elif isinstance(bound, Gt):
            choices.append(number(max_value=bound.gt))
        elif isinstance(bound, Le):
            choices.append(number(min_value=bound.le + 1 if annotation is int else None)
                           .filter(lambda v, b=bound.le: v > b))
        elif isinstance(bound, Lt):
            choices.append(number(min_value=bound.lt))
    if annotation is float:
        choices = [c.filter(lambda v: v == v) for c in choices]   # NaN is a wrong type above
    return st.one_of(choices) if choices else None


# Fields whose range is a rule of the project rather than a numeric bound.
SEMANTIC_BAD = {
    "data.dataset": NONSENSE,
    "sweep.methods": st.lists(NONSENSE, min_size=1, max_size=2) | st.just([]),
    "sweep.betas": st.lists(st.floats(max_value=0, allow_nan=False), min_size=1, max_size=3)
    | st.just([]),
    "sweep.latent_dims": st.lists(st.integers(max_value=0), min_size=1, max_size=2) | st.just([]),
    "sweep.archs": st.lists(NONSENSE, min_size=1, max_size=2),
    "sweep.search.metric": NONSENSE,
}
# Grid lists name one trial per value: a repeated value is refused too.
REPEATED = {"sweep.methods": ["echo", "echo"], "sweep.betas": [1.0, 0.5, 1.0],
            "sweep.archs": ["mlp", "mlp"], "sweep.latent_dims": [8, 8]}


@st.composite
def bad_field(draw):
    """(dotted path, params dict with that one field set to a bad value)."""
    path, annotation, optional, metadata = draw(st.sampled_from(LEAVES))
    dotted = ".".join(path)
    strategies = [wrong_type(annotation, optional)]
    bounded = out_of_range(annotation, metadata) if annotation in (int, float) else None
    if bounded is not None:
        strategies.append(bounded)
    if dotted in SEMANTIC_BAD:
        strategies.append(SEMANTIC_BAD[dotted])
    if dotted in REPEATED:
        strategies.append(st.just(REPEATED[dotted]))
    value = draw(st.one_of(strategies))
    raw: dict = {}
    node = raw
    for key in path[:-1]:
        node = node.setdefault(key, {})
    # An optional nested model (Range) needs its other field valid for the error to be this one.
    if path[-2:-1] == ("lr",):
        node.update({"low": 0.1, "high": 0.5})
    node[path[-1]] = value
    return dotted, raw


def assert_refused_naming(path: Path, field: str) -> str:
    with pytest.raises(ParamsError) as info:
        load_params(path)
    message = str(info.value)
    assert field in message, f"error does not name {field}: {message}"
    assert "\n" not in message, f"error is not one line: {message!r}"
    assert str(path) in message, f"error does not name the file: {message}"
    return message


def test_every_leaf_field_is_covered():
    """The walk finds the schema's fields (guards against the walk silently finding none)."""
    for expected in ("train.epochs", "train.lr", "method_options", "sweep.betas", "sweep.methods",
                     "data.dataset", "sweep.search.method_options", "sweep.search.lr.high",
                     "evaluate.iwae_k"):
        assert expected in LEAF_PATHS
    for _, annotation, optional, metadata in LEAVES:
        wrong_type(annotation, optional)          # raises for a field kind with no strategy


@settings(PROPERTY_SETTINGS, max_examples=250)
@given(case=bad_field())
def test_any_bad_field_is_refused_naming_it(tmp_path, case):
    field, raw = case
    event(field)
    assert_refused_naming(write_params(tmp_path, raw), field)


@PROPERTY_SETTINGS
@given(section=st.sampled_from([None, *Params.model_fields]), key=NONSENSE)
def test_unknown_keys_are_refused_naming_them(tmp_path, section, key):
    raw = {key: 1} if section is None else {section: {key: 1}}
    assume(section is not None or key not in Params.model_fields)
    field = key if section is None else f"{section}.{key}"
    assert_refused_naming(write_params(tmp_path, raw), field)


@PROPERTY_SETTINGS
@given(batch_size=st.integers(2, 300), d_max=st.none() | st.integers(1, 400),
       replace=st.booleans(), high=st.none() | st.floats(0.2, 0.9999))
def test_echo_exactness_rule_is_exactly_the_truncation_bound(tmp_path, batch_size, d_max,
                                                             replace, high):
    """Accepted iff d_max < batch size (without replacement) and the clipping range stays at or
    below the r that solves the truncation bound M r^d_max / (1 - r) = 2^-23 (paper, Sec. 5)."""
    raw = {"train": {"batch_size": batch_size},
           "method_options": {"echo": {"d_max": d_max, "replace": replace}}}
    if high is not None:
        raw["sweep"] = {"search": {"method_options": {"echo": {"clip_factor": {"low": 0.1,
                                                                               "high": high}}}}}
    terms = d_max if d_max is not None else batch_size - 1
    path = write_params(tmp_path, raw)
    if not replace and terms >= batch_size:
        assert_refused_naming(path, "method_options.echo.d_max")
    elif high is not None and high > clip_factor(terms):
        assert_refused_naming(path, "sweep.search.method_options.echo.clip_factor")
    else:
        params = load_params(path)
        assert params.train.batch_size == batch_size


@PROPERTY_SETTINGS
@given(epochs=st.integers(1, 10**6), batch_size=st.integers(2, 10**4),
       lr=st.floats(1e-8, 1.0), lr_decay_start=st.floats(0.0, 1.0),
       betas=st.lists(st.floats(1e-6, 1e6), min_size=1, max_size=4, unique=True),
       methods=st.lists(st.sampled_from(sorted(METHODS)), min_size=1, max_size=3, unique=True),
       dataset=st.sampled_from(DATASETS))
def test_in_range_values_are_accepted(tmp_path, epochs, batch_size, lr, lr_decay_start, betas,
                                      methods, dataset):
    """The validation is not stricter than documented: every in-range value loads unchanged."""
    raw = {"data": {"dataset": dataset},
           "train": {"epochs": epochs, "batch_size": batch_size, "lr": lr,
                     "lr_decay_start": lr_decay_start},
           "sweep": {"betas": betas, "methods": methods}}
    params = load_params(write_params(tmp_path, raw))
    train = params.train
    assert (train.epochs, train.batch_size, train.lr) == (epochs, batch_size, lr)
    assert params.sweep.betas == betas and params.sweep.methods == methods


def test_unparsable_yaml_is_one_line_naming_the_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  epochs: [1, 2\n  lr: 0.1\n")
    with pytest.raises(ParamsError) as info:
        load_params(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# echo_sample's input validation
# ---------------------------------------------------------------------------------------------

POISON = st.sampled_from(["nan_f", "inf_f", "nan_log_s", "inf_log_s", "zero_log_s",
                          "positive_log_s"])


@st.composite
def echo_inputs(draw):
    any_shape = st.lists(st.integers(0, 5), min_size=0, max_size=3)
    # Mostly [B, D] matrices (the valid kind), sometimes any rank.
    matrix = st.tuples(st.integers(0, 6), st.integers(0, 4)).map(list)
    f_shape = draw(matrix if draw(st.integers(0, 3)) > 0 else any_shape)
    same = draw(st.integers(0, 3)) > 0
    s_shape = f_shape if same else draw(any_shape)
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    f = torch.rand(f_shape, generator=g, dtype=dtype) * 2 - 1          # tanh range, |f| <= 1
    log_s = -torch.rand(s_shape, generator=g, dtype=dtype) * 5 - 1e-3   # S < 1
    poison = draw(POISON) if draw(st.booleans()) else None
    if poison and f.numel() and log_s.numel():
        target = f if poison.endswith("_f") else log_s
        value = {"nan": float("nan"), "inf": float("inf"), "zero": 0.0,
                 "positive": 0.5}[poison.split("_")[0]]
        target.view(-1)[draw(st.integers(0, target.numel() - 1))] = value
    d_max = draw(st.one_of(st.none(), st.integers(1, 5)) if draw(st.booleans()) else
                 st.one_of(st.integers(-3, 12), st.booleans(), st.floats(-2, 12, allow_nan=False),
                           st.just("3")))
    replace = draw(st.booleans())
    return f, log_s, d_max, replace


@settings(max_examples=300, deadline=None)
@given(inputs=echo_inputs())
def test_echo_sample_gives_a_valid_sample_or_a_value_error(inputs):
    f, log_s, d_max, replace = inputs
    try:
        z = echo_sample(f, log_s, d_max=d_max, replace=replace,
                        generator=torch.Generator().manual_seed(0))
    except ValueError as err:
        assert str(err) and "\n" not in str(err)
        event("refused")
        return
    event("accepted")
    # Accepted: then the inputs were valid, and the sample has their shape and is finite.
    assert f.dim() == 2 and f.shape == log_s.shape and f.shape[0] >= 2
    batch = f.shape[0]
    assert d_max is None or (type(d_max) is int and d_max >= 1)
    assert replace or d_max is None or d_max <= batch - 1
    assert bool(torch.isfinite(f).all() and torch.isfinite(log_s).all() and (log_s < 0).all())
    assert z.shape == f.shape
    assert bool(torch.isfinite(z).all())
    # |z| <= |f| + S |eps| <= 1 + sum_l r^l < 1 / (1 - max S): Echo noise is bounded (Lemma 2.1).
    if z.numel():
        s_max = float(log_s.exp().max())
        assert float(z.abs().max()) <= 1 + s_max / (1 - s_max) + 1e-5


@settings(max_examples=100, deadline=None)
@given(batch=st.integers(2, 6), dim=st.integers(1, 4), d_max=st.integers(1, 8),
       replace=st.booleans())
def test_echo_sample_accepts_every_valid_input(batch, dim, d_max, replace):
    """Every valid combination is accepted (validation is not stricter than the docstring)."""
    assume(replace or d_max <= batch - 1)
    f = torch.rand(batch, dim) * 2 - 1
    log_s = -torch.rand(batch, dim) - 0.01
    z = echo_sample(f, log_s, d_max=d_max, replace=replace)
    assert z.shape == (batch, dim) and bool(torch.isfinite(z).all())


@pytest.mark.parametrize("content", [b"\xff\xfe\x00binary\x80", b"- just\n- a list\n", b"42\n"],
                         ids=["binary", "list", "scalar"])
def test_corrupt_params_file_is_one_line_naming_the_file(tmp_path, content):
    path = tmp_path / "params.yaml"
    path.write_bytes(content)
    with pytest.raises(ParamsError) as info:
        load_params(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
