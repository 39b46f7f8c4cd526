"""pipeline/'s layout (docs/sweep.md, "Layout of pipeline/"): two halves, pipeline.sweep and
pipeline.results, on shared modules; no import between the halves and no import cycle; Tune
experiments pickled under the old flat module paths still find their classes."""
from __future__ import annotations

import ast
import pickle
from pathlib import Path

import pytest

import pipeline
from pipeline.sweep.moved import MOVED_MODULES, OLD_SWEEP_NAMES

PIPELINE = Path(pipeline.__file__).resolve().parent


def import_graph() -> dict[str, set[str]]:
    """pipeline module -> the pipeline modules it imports (inside functions too)."""
    graph = {}
    for path in PIPELINE.rglob("*.py"):
        parts = path.relative_to(PIPELINE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
                names |= {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
        graph[name] = names
    modules = set(graph)
    # `from pipeline.sweep import run` names a module; `from pipeline.x import y` a name in x
    return {name: {n for n in names if n in modules and n != name}
            for name, names in graph.items()}


def test_the_halves_do_not_import_each_other():
    graph = import_graph()
    half = {name: name.split(".")[1] for name in graph
            if name.split(".")[1:2] in (["sweep"], ["results"])}
    assert {"pipeline.sweep.run", "pipeline.results.tracking"} <= set(half)   # the walk works
    crossing = sorted(f"{a} -> {b}" for a, deps in graph.items() for b in deps
                      if a in half and b in half and half[a] != half[b])
    assert crossing == [], f"pipeline.sweep and pipeline.results import each other: {crossing}"
    shared = [name for name in graph if name not in half]
    leaks = sorted(f"{a} -> {b}" for a in shared for b in graph[a] if b in half)
    assert leaks == [], f"a shared module imports a half: {leaks}"


def test_pipeline_modules_import_no_cycle():
    graph = import_graph()

    def reaches(start: str, target: str, seen: set) -> bool:
        for dep in graph.get(start, ()):
            if dep == target or (dep not in seen and reaches(dep, target, seen | {dep})):
                return True
        return False

    assert graph["pipeline.sweep.run"]               # the walk found the sweep's imports
    cycles = sorted(name for name in graph if reaches(name, name, {name}))
    assert cycles == [], f"pipeline modules in an import cycle: {cycles}"


# (module, name) as a Tune experiment written before pipeline/ was split pickled them
# (tuner.pkl and searcher-state-*.pkl of a sweep with ASHA, read with pickletools), and the
# other names the old modules held that Tune pickles.
OLD_PICKLED = [("pipeline.experiment", "SignedStateFileSystem"),
               ("pipeline.search", "GridOptunaSearch"), ("pipeline.search", "GridPointASHA"),
               ("pipeline.sweep", "_trial_id"), ("pipeline.tracking", "SweepTracker"),
               ("pipeline.trainable", "train_trial"), ("pipeline.trainable", "train_packed_trial"),
               *(("pipeline.sweep", name) for name in OLD_SWEEP_NAMES)]


@pytest.mark.parametrize("module,name", OLD_PICKLED)
def test_a_pickle_naming_an_old_module_path_loads_the_class_now_there(module, name):
    found = pickle.loads(f"c{module}\n{name}\n.".encode())        # the GLOBAL opcode
    assert found.__module__.startswith(("pipeline.sweep.", "pipeline.results."))
    assert found.__module__ != module
    if module in MOVED_MODULES:
        assert found.__module__ == MOVED_MODULES[module]


def test_an_unknown_name_of_the_old_sweep_module_is_an_attribute_error():
    import pipeline.sweep
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        pipeline.sweep.nothing_here                      # noqa: B018
