"""Moved to tests/support/system_tools.py; kept for modules not yet importing it from there."""
from support.system_tools import CI_ENV, INSTALL_ALL, chromium, require_tool  # noqa: F401
