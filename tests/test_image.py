"""The image and its dependencies (issue 27 item 6): a non-root user, no blanket
safe.directory, the base image by digest, every Python package from requirements.lock with
hashes, the lock made from pyproject.toml's declarations (CI runs this file and installs from
the lock), and cluster.yaml's nodes on the image of the built version, never `latest`."""
from __future__ import annotations

import importlib.util
import os
import re
import tomllib
from importlib import metadata

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from support import REPO

DOCKERFILE = (REPO / "Dockerfile").read_text()
RELOCK = "run `pip install uv && python3 .ci/lock.py`"


def _lock_module():
    spec = importlib.util.spec_from_file_location("ci_lock", REPO / ".ci" / "lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


LOCK_TOOL = _lock_module()


def _lock() -> tuple[str, dict[str, tuple[str, str]]]:
    """(text, {canonical name: (version, its block)})."""
    text = (REPO / "requirements.lock").read_text()
    _, blocks = LOCK_TOOL.split_blocks(text)
    pins = {}
    for block in blocks:
        m = re.match(r"^([A-Za-z0-9._-]+)==([^\s;\\]+)", block)
        assert m, f"requirements.lock: not an exact pin: {block.splitlines()[0]}"
        pins[canonicalize_name(m.group(1))] = (m.group(2), block)
    return text, pins


def _declared() -> list[Requirement]:
    """Every requirement pyproject.toml declares (core and every extra), self-references out."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        reqs += [Requirement(r) for r in extra]
    return [r for r in reqs if canonicalize_name(r.name) != "echo-rd"]


def _torch_only(name: str) -> bool:
    return bool(LOCK_TOOL.TORCH_ONLY.match(name))


def test_image_runs_as_a_non_root_user_without_a_blanket_safe_directory():
    users = re.findall(r"^USER\s+(\S+)", DOCKERFILE, re.M)
    assert users and users[-1] not in ("root", "0") and not users[-1].startswith("0:")
    assert DOCKERFILE.index(f"USER {users[-1]}") < DOCKERFILE.index("\nCMD ")
    assert re.search(rf"useradd --uid \"\$\{{UID\}}\" [^\n]*\s{users[-1]}\s*$", DOCKERFILE, re.M)
    assert re.search(r"^ARG UID=1000$", DOCKERFILE, re.M)     # = cluster.yaml's ssh_user, ubuntu
    instructions = "\n".join(line for line in DOCKERFILE.splitlines()
                             if not line.lstrip().startswith("#"))
    assert "safe.directory" not in instructions
    # The workspace (results, mlflow.db, the git snapshot) belongs to that user.
    assert re.search(rf"chown -R {users[-1]}:{users[-1]} /workspace/echo-rd", DOCKERFILE)


def test_base_image_is_pinned_by_digest():
    base = re.search(r"^ARG\s+BASE_IMAGE=(\S+)", DOCKERFILE, re.M).group(1)
    assert re.fullmatch(r"[\w./-]+(:[\w.-]+)?@sha256:[0-9a-f]{64}", base), base


def test_image_installs_only_the_lock_with_hashes():
    installs = re.findall(r"pip install [^\n&]*", DOCKERFILE)
    assert installs == ["pip install --require-hashes --no-deps -r requirements.lock",
                        "pip install --no-deps --no-build-isolation -e . "], installs
    assert "pip check" in DOCKERFILE
    assert DOCKERFILE.index("COPY requirements.lock") < DOCKERFILE.index("COPY . .")
    ignore = (REPO / ".dockerignore").read_text().split()
    assert "requirements.lock" not in ignore and "*.lock" not in ignore


def test_cluster_nodes_run_the_image_of_the_built_version():
    import yaml

    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    image = yaml.safe_load((REPO / "cluster.yaml").read_text())["docker"]["image"]
    assert image.rsplit(":", 1)[-1] == version, f"cluster.yaml runs {image}, the project is {version}"
    assert f"echo-rd:{version} ." in DOCKERFILE                  # the documented build tags it


def test_lock_agrees_with_pyproject():
    text, pins = _lock()
    first = text.splitlines()[0]
    assert first == LOCK_TOOL.FINGERPRINT + LOCK_TOOL.dependency_fingerprint(), \
        f"requirements.lock was made from other pyproject.toml dependencies; {RELOCK}"
    for req in _declared():
        name = canonicalize_name(req.name)
        if _torch_only(name):
            assert name not in pins, f"requirements.lock pins {name}, which the base provides"
            continue
        assert name in pins, f"requirements.lock lacks {req.name} (pyproject.toml); {RELOCK}"
        assert Version(pins[name][0]) in req.specifier, \
            f"requirements.lock pins {name}=={pins[name][0]}, pyproject.toml asks {req}; {RELOCK}"
    for name, (version, block) in pins.items():
        assert "--hash=sha256:" in block, f"requirements.lock: {name} has no hash"
        assert not _torch_only(name), f"requirements.lock pins {name}, which torch brings"


def test_lock_is_closed_under_its_packages_requirements():
    """Every requirement of every locked package (for the extras asked of it, on CPython 3.11
    Linux) is a locked package at a version it accepts, or torch's own: what `pip install
    --no-deps -r requirements.lock` relies on. Read from the installed packages' metadata where
    their version is the pinned one (in CI, after installing the lock, all of them)."""
    _, pins = _lock()
    env = {**default_environment(), "python_version": "3.11", "python_full_version": "3.11.7",
           "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
           "os_name": "posix", "implementation_name": "cpython"}
    queue = [(canonicalize_name(r.name), frozenset(r.extras)) for r in _declared()
             if r.marker is None or r.marker.evaluate({**env, "extra": ""})]
    seen, unchecked = set(), []
    while queue:
        name, extras = queue.pop()
        if (name, extras) in seen or _torch_only(name):
            continue
        seen.add((name, extras))
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            unchecked.append(name)
            continue
        if canonicalize_name(dist.version) != canonicalize_name(pins[name][0]):
            unchecked.append(name)
            continue
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is not None and not any(
                    req.marker.evaluate({**env, "extra": e}) for e in ("", *extras)):
                continue
            dep = canonicalize_name(req.name)
            if _torch_only(dep):
                continue
            assert dep in pins, f"requirements.lock lacks {dep}, which {name} needs; {RELOCK}"
            assert Version(pins[dep][0]) in req.specifier or not req.specifier, \
                f"requirements.lock pins {dep}=={pins[dep][0]}, {name} needs {req}; {RELOCK}"
            queue.append((dep, frozenset(req.extras)))
    if os.environ.get("ECHO_CI"):
        assert not unchecked, f"CI did not install the lock's versions of {sorted(unchecked)}"
    assert len(seen) > 50                                          # the walk did reach the lock


def test_ci_runs_the_readmes_test_command_in_two_workers():
    """`.ci/run` ends with the README's test command, character for character, and that command
    runs the suite in two pytest-xdist workers (installed from the lock: the [test] extra)."""
    readme = (REPO / "README.md").read_text()
    commands = re.findall(r"^pip install -e \"\.\[test\]\" && (python3 -m pytest[^\n]*)$", readme,
                          re.M)
    assert len(commands) == 1, commands
    last = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert last == commands[0]
    assert "-n 2" in last and "--dist loadgroup" in last
    test_extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["test"]
    assert any(canonicalize_name(Requirement(r).name) == "pytest-xdist" for r in test_extra)
