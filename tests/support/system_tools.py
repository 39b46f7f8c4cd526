"""System programs some tests need (not Python packages): sshd, rsync, chromium.

On a machine without one, the test that needs it is skipped with one line naming the Debian
package to install (the README gives the one command installing them all). In CI (.ci/run sets
ECHO_CI=1, after installing them) a missing program is a failure, never a skip.
"""
from __future__ import annotations

import os
import shutil

import pytest

CI_ENV = "ECHO_CI"
INSTALL_ALL = "apt-get install openssh-server openssh-client rsync chromium"


def require_tool(tool: str, package: str) -> str:
    """The path of `tool` (a name on PATH or an absolute path); else skip (fail in CI)."""
    path = shutil.which(tool)
    if path is None and os.path.isabs(tool) and os.access(tool, os.X_OK):
        path = tool
    if path is not None:
        return path
    message = f"{tool} not found: apt-get install {package} (all: {INSTALL_ALL})"
    if os.environ.get(CI_ENV):
        pytest.fail(f"{message}; {CI_ENV} is set, so a missing program fails", pytrace=False)
    pytest.skip(message)


def chromium() -> str:
    """Debian's headless-capable chromium, which Playwright drives (no browser download)."""
    for name in ("chromium", "/usr/bin/chromium"):
        path = shutil.which(name) or (name if os.access(name, os.X_OK) else None)
        if path:
            return path
    return require_tool("chromium", "chromium")
