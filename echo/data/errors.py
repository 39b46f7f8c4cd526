"""The one error of the data layer, and how a caller says its fix in its own terms."""
from __future__ import annotations

from typing import Callable, Mapping


class DataError(ValueError):
    """A missing or malformed data file; the message names the file and the fix.

    Where the fix is a library argument, the message spells it `name=value` (e.g. "or set
    check_sizes=False for a custom subset", "(root='data/raw')") and `arguments` maps each such
    name to that value, so a caller that exposes the argument under another name (a config
    file's field) can restate the message in its own terms with `rephrased`."""

    def __init__(self, message: str, **arguments: object):
        super().__init__(message)
        self.arguments = arguments

    def rephrased(self, names: Mapping[str, str],
                  spell: Callable[[str, object], str] = lambda name, value: f"{name}={value!r}"
                  ) -> str:
        """The message with each `argument=value` it names replaced by `spell(names[argument],
        value)`; arguments missing from `names` keep their library spelling."""
        text = str(self)
        for argument, value in self.arguments.items():
            if argument in names:
                text = text.replace(f"{argument}={value!r}", spell(names[argument], value))
        return text
