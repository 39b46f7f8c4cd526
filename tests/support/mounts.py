"""Folders and files that take no write, for real: the tests run as root, for whom permission
bits do not stop a write, so a read-only bind mount (or `chattr +i` where mounts are not
allowed), and a tiny tmpfs for a full disk. Every mount is undone, also on failure; a test is
skipped where neither is allowed."""
from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

import pytest


def _run(cmd: list[str]) -> bool:
    return subprocess.run(cmd, capture_output=True).returncode == 0


@contextlib.contextmanager
def read_only(path: Path):
    """`path` (a folder or a file) unwritable even for root: a read-only bind mount onto itself,
    else the immutable attribute (`chattr +i`). Yields how ("read-only bind mount" or
    "chattr +i")."""
    if _run(["mount", "--bind", "-o", "ro", str(path), str(path)]):
        try:
            yield "read-only bind mount"
        finally:
            assert _run(["umount", str(path)]), f"could not unmount {path}"
    elif _run(["chattr", "+i", str(path)]):
        try:
            yield "chattr +i"
        finally:
            _run(["chattr", "-i", str(path)])
    else:
        pytest.skip("cannot make a file or folder unwritable here (no mount, no chattr)")


@contextlib.contextmanager
def unwritable(folder: Path):
    """`folder` (made if missing) unwritable even for root (see `read_only`)."""
    folder.mkdir(parents=True, exist_ok=True)
    with read_only(folder) as how:
        yield how


@contextlib.contextmanager
def tmpfs(folder: Path, size: str = "64k"):
    """`folder` (made if missing) as a tmpfs of `size` (a write larger than that fails with
    ENOSPC); grow it in place with `grow(folder, "200m")`."""
    folder.mkdir(parents=True, exist_ok=True)
    if not _run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)]):
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield "full tmpfs"
    finally:
        assert _run(["umount", "-l", str(folder)]), f"could not unmount {folder}"


def grow(folder: Path, size: str) -> None:
    assert _run(["mount", "-o", f"remount,size={size}", str(folder)]), f"could not grow {folder}"
