"""A test that needs a missing system program: skipped with the package to install, except in
CI (ECHO_CI, set by .ci/run), where it fails."""
from __future__ import annotations

import sys

import pytest

from support.system_tools import CI_ENV, require_tool

MISSING = "echo-rd-no-such-program"


def test_a_missing_program_skips_naming_its_package(monkeypatch):
    monkeypatch.delenv(CI_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception) as skipped:
        require_tool(MISSING, "some-package")
    assert "apt-get install some-package" in str(skipped.value)
    assert "\n" not in str(skipped.value)


def test_in_ci_a_missing_program_fails(monkeypatch):
    monkeypatch.setenv(CI_ENV, "1")
    with pytest.raises(pytest.fail.Exception) as failed:
        require_tool(MISSING, "some-package")
    assert "apt-get install some-package" in str(failed.value)


def test_a_present_program_is_found(monkeypatch):
    monkeypatch.setenv(CI_ENV, "1")
    assert require_tool(sys.executable, "python3") == sys.executable


def test_ci_sets_the_variable():
    from pathlib import Path
    assert f"export {CI_ENV}=1" in (Path(__file__).resolve().parents[1] / ".ci/run").read_text()
