"""The sweep's half of pipeline/: the grid and search (`search`), what a trial is (`trials`) and
runs in a Ray worker (`trainable`), the checks before Ray starts (`checks`), the Tune experiment
folder (`experiment`), MLflow from the driver (`tracking`: a Tune callback over `runs` and the
`outage` queue), and `run` (`run_sweep`). It never imports pipeline.results."""
from pipeline.sweep import moved as _moved

_moved.install()      # Tune experiments pickled under pipeline/'s old module paths resume


def __getattr__(name: str):
    # The old `pipeline.sweep` module's names that Tune pickled (pipeline.moved).
    from pipeline.sweep.moved import OLD_SWEEP_NAMES
    if name in OLD_SWEEP_NAMES:
        import importlib
        module, new_name = OLD_SWEEP_NAMES[name]
        return getattr(importlib.import_module(module), new_name)
    raise AttributeError(f"module 'pipeline.sweep' has no attribute {name!r}")
