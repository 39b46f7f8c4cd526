"""The checks of params.yaml's per-method options (method_options, dataset_method_options,
sweep.search.method_options): known methods, options their builders take (echo.method_options),
values of the kind of the option's default. The methods' own rules (e.g. Echo's truncation) run
in pipeline.config, where the training settings are known."""
from __future__ import annotations

from echo import METHODS
from echo.methods import check_method_options, method_options


def known_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {sorted(METHODS)}")
    return method


def check_option_values(method: str, options: dict) -> dict:
    """An option's YAML value must be of its default's kind: a number where the default is a
    number (not a string or a boolean), a boolean where it is a boolean."""
    defaults = method_options(method)
    for name, value in options.items():
        default = defaults.get(name)
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ValueError(f"{method}.{name} must be true or false, got {value!r}")
        if isinstance(default, (int, float)) and not isinstance(default, bool) and \
                (isinstance(value, (bool, str))):
            raise ValueError(f"{method}.{name} must be a number, got {value!r}")
    return options


def checked_options(v: dict, prefix: str) -> dict:
    """{method: options} with known methods, options their builders take, values of the right
    kind; errors name `<prefix>.<method>.<option>`."""
    for method, options in v.items():
        known_method(method)
        check_method_options(method, options or {},
                             names={o: f"{prefix}.{method}.{o}" for o in options or {}})
        check_option_values(method, options or {})
    return {method: dict(options or {}) for method, options in v.items()}
