#!/usr/bin/env python3
"""Write requirements.lock: every package `pip install -e ".[test]"` needs, pinned with hashes,
resolved from pyproject.toml by uv for CPython 3.11 on x86_64 Linux (the image's and CI's).

    pip install uv && python3 .ci/lock.py [--constraints FILE]

torch is not in the lock, nor what only torch needs (triton, sympy, mpmath, the nvidia-* and
cuda-* wheels): torch comes from the base image (pinned by digest in the Dockerfile) or from the
build you install first (CPU or CUDA), and the lock must not replace its CUDA libraries. The
first line records a fingerprint of pyproject.toml's dependency declarations, which
tests/test_image.py compares (and CI runs it): a changed dependency without a new lock fails.
`--constraints` (e.g. a `pip freeze` of the tested environment) keeps the versions it names.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
PYTHON = "3.11"
PLATFORM = "x86_64-manylinux_2_28"
FINGERPRINT = "# pyproject-dependencies-sha256: "
TORCH = "torch==2.13.0"                  # the version the project is tested with (README)
# Packages that only torch needs: left to whoever provides torch.
TORCH_ONLY = re.compile(r"^(torch|triton|sympy|mpmath|nvidia-.*|cuda-.*)$")


def dependency_fingerprint(pyproject: Path = ROOT / "pyproject.toml") -> str:
    """sha256 of what the lock is resolved from: requires-python, dependencies, extras."""
    project = tomllib.loads(pyproject.read_text())["project"]
    declared = {key: project.get(key) for key in
                ("requires-python", "dependencies", "optional-dependencies")}
    return hashlib.sha256(json.dumps(declared, sort_keys=True).encode()).hexdigest()


def split_blocks(text: str) -> tuple[list[str], list[str]]:
    """(leading comment lines, one block per pinned package: its line, hashes and via lines)."""
    head, blocks = [], []
    for line in text.splitlines():
        if re.match(r"^[A-Za-z0-9]", line):
            blocks.append(line)
        elif blocks:
            blocks[-1] += "\n" + line
        else:
            head.append(line)
    return head, blocks


def package(block: str) -> str:
    return re.split(r"[=<>!~ \[;]", block, maxsplit=1)[0].lower()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--constraints", type=Path, help="versions to keep (pip freeze format)")
    args = parser.parse_args()
    uv = shutil.which("uv")
    if uv is None:
        print("error: uv not found: pip install uv", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        constraints = Path(tmp) / "constraints.txt"
        lines = [TORCH]
        if args.constraints:
            lines += [line for line in args.constraints.read_text().splitlines()
                      if "==" in line and not line.startswith(("-e", "#"))
                      and not TORCH_ONLY.match(package(line)) and package(line) != "echo-rd"]
        constraints.write_text("\n".join(lines) + "\n")
        out = Path(tmp) / "lock.txt"
        subprocess.run([uv, "pip", "compile", "pyproject.toml", "--extra", "test",
                        "--generate-hashes", "--python-version", PYTHON,
                        "--python-platform", PLATFORM, "--no-header", "--quiet",
                        "--index-url", "https://pypi.org/simple", "-c", str(constraints),
                        "-o", str(out)], cwd=ROOT, check=True)
        _, blocks = split_blocks(out.read_text())
    kept = [b for b in blocks if not TORCH_ONLY.match(package(b))]
    # The via lines name the temporary constraints file; they say nothing the pins do not.
    kept = ["\n".join(line for line in b.splitlines()
                      if "constraints.txt" not in line) for b in kept]
    LOCK.write_text("\n".join([
        FINGERPRINT + dependency_fingerprint(),
        "# requirements.lock: made by `python3 .ci/lock.py` (uv pip compile pyproject.toml "
        f"--extra test --generate-hashes, CPython {PYTHON}, {PLATFORM}); do not edit.",
        "# Without torch and what only torch needs (the base image or your own build provides "
        "them). Install:",
        "#   pip install --require-hashes --no-deps -r requirements.lock && "
        "pip install --no-deps -e . && pip check",
        *kept, ""]))
    print(f"{LOCK.name}: {len(kept)} packages ({len(blocks) - len(kept)} torch-only left out)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
