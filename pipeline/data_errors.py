"""The data layer's errors in params.yaml's words: echo.data names its own arguments
("set check_sizes=False"), the stages name the field to change ("set data.check_sizes: false")."""
from __future__ import annotations

from echo.data import DataError

# The params.yaml field behind each argument of echo.data's loaders.
DATA_FIELDS = {"root": "data.raw_dir", "download": "data.download",
               "check_sizes": "data.check_sizes"}


def yaml_setting(field: str, value: object) -> str:
    """`field: value` as params.yaml spells it (booleans lower case)."""
    shown = str(value).lower() if isinstance(value, bool) else value
    return f"{field}: {shown}"


def data_error_line(err: Exception) -> str:
    """An error's one line; a DataError's with the library arguments it names as params.yaml
    fields."""
    return err.rephrased(DATA_FIELDS, yaml_setting) if isinstance(err, DataError) else str(err)
