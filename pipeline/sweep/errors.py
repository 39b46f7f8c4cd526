"""Why a sweep stops: `stages.sweep` prints any of these as one line and exits 1."""
from __future__ import annotations


class SweepError(RuntimeError):
    """The sweep cannot start or did not finish; the message says why and what to do."""


class SweepInterrupted(SweepError):
    """Stopped before every trial finished; running the stage again resumes it."""


class SweepFailed(SweepError):
    """Every trial ended, but none completed: there are no results to record."""


class SweepLocked(SweepError):
    """Another driver is running the same experiment."""


def unwritable(what: str, folder, err: OSError) -> SweepError:
    """One output folder that takes no write (read-only, full, a file in its place), in the
    words of every such refusal: the output probes' and the experiment lock's."""
    reason = err.strerror or type(err).__name__
    return SweepError(f"{what}: cannot write to {folder} ({reason}); make it writable or free "
                      f"space there before the sweep trains")
