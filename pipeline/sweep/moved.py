"""Module paths of pipeline/ before it was housed in sweep/ and results/, for the Tune
experiments pickled then: Tune pickles the searcher, callbacks, storage filesystem and trial
name function by module and name (`pipeline.search.GridOptunaSearch`, `pipeline.sweep._trial_id`,
...), and `Tuner.restore` must find them to resume such an experiment.

An old module path imports as the module that now holds its names (a meta path finder, so
nothing is imported until a pickle asks); `pipeline.sweep`, now a package, answers its old
names lazily (its __init__). Installed when pipeline.sweep is imported, as the sweep does before it
restores an experiment. Not an API: import from the new paths.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

MOVED_MODULES = {
    "pipeline.checks": "pipeline.sweep.checks",
    "pipeline.experiment": "pipeline.sweep.experiment",
    "pipeline.search": "pipeline.sweep.search",
    "pipeline.sweep_errors": "pipeline.sweep.errors",
    "pipeline.tracking": "pipeline.sweep.tracking",
    "pipeline.trainable": "pipeline.sweep.trainable",
    "pipeline.trials": "pipeline.sweep.trials",
}
# Names the old `pipeline.sweep` module held that a pickle may name: (module, name) now.
OLD_SWEEP_NAMES = {
    **{name: ("pipeline.sweep.run", name) for name in (
        "_trial_id", "_EndedTrials", "_StopOnFullDisk", "_RunLimiter", "_ResumeKnobs")},
    "_TrialStatus": ("pipeline.sweep.run", "_EndedTrials"),   # its name before it was renamed
    "GridOptunaSearch": ("pipeline.sweep.search", "GridOptunaSearch"),
    "GridPointASHA": ("pipeline.sweep.search", "GridPointASHA"),
}


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old module path (MOVED_MODULES) as the module that replaced it."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED_MODULES:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        return importlib.import_module(MOVED_MODULES[spec.name])

    def exec_module(self, module):
        pass                     # the new module is imported (executed) under its own name


def install() -> None:
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
