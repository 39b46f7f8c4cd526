"""Writing a file so that readers never see half of it, and the digest of a file.

The one `atomic_write` and the one `file_digest` of the project: checkpoints, metrics, tables,
plots, downloads and prepared data all go through them.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it over `path`.

    The temporary is `<name>.tmp` in the same directory, so os.replace is an atomic rename on
    the same file system: a crash never leaves a half-written `path`, only a stale `.tmp` that
    the next write overwrites. When `write` raises, the temporary is removed and `path` keeps
    its earlier content."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """The hex digest of a file's bytes (any hashlib algorithm, e.g. "md5"), read in 1 MiB
    blocks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
