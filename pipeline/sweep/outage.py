"""A tracking store that goes away during a sweep: the driver's MLflow writes wait, in order, and
Tune's loop (so every trial) goes on; they are written when the store is back. Past
`max_outage` seconds (env ECHO_TRACKING_MAX_OUTAGE_S) the sweep is stopped as Ctrl-C would stop
it (its trials saved, a rerun resumes) and `unreachable` says why.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from typing import Callable

from pipeline.mlflow_store import first_line, store_unreachable

# How long a sweep goes on while its tracking store is unreachable (env
# ECHO_TRACKING_MAX_OUTAGE_S), and how often the store is tried meanwhile.
MAX_OUTAGE_SECONDS = 600.0
RETRY_SECONDS = 5.0


class OutageQueue:
    """Writes to the store at `uri` (callables), in order; the ones it could not make yet wait
    for the store to come back."""

    def __init__(self, uri: str):
        self.uri = uri
        self._queue: list[Callable[[], None]] = []
        self._down_since: float | None = None     # time.monotonic() it became unreachable
        self._tried = 0.0
        self._last_error = ""
        self.max_outage = float(os.environ.get("ECHO_TRACKING_MAX_OUTAGE_S", MAX_OUTAGE_SECONDS))
        self.unreachable = ""                     # why the sweep was stopped, if it was

    def __getstate__(self):
        # Pickled with the Tune callback that holds it; waiting writes are not state.
        return {**self.__dict__, "_queue": [], "_down_since": None}

    def submit(self, op: Callable[[], None]) -> None:
        """Write now if the store answers, else keep `op` (after those already waiting)."""
        self._queue.append(op)
        self.drain()

    def drain(self, wait: float = 0.0) -> bool:
        """Write what is buffered, in order (while the store is away, try at most every
        RETRY_SECONDS); keep trying for `wait` seconds. True when nothing is left."""
        deadline = time.monotonic() + wait
        while True:
            if self._down_since is None or \
                    time.monotonic() - self._tried >= RETRY_SECONDS:
                if self._write_queue():
                    return True
            self._check_outage()
            if self.unreachable or time.monotonic() >= deadline:
                return False
            time.sleep(max(0.0, min(RETRY_SECONDS, deadline - time.monotonic())))

    def _write_queue(self) -> bool:
        while self._queue:
            try:
                self._queue[0]()
            except Exception as err:  # noqa: BLE001 - only an unreachable store is absorbed
                if not store_unreachable(err):
                    raise
                self._tried = time.monotonic()
                self._last_error = first_line(err)
                if self._down_since is None:
                    self._down_since = self._tried
                    print(f"warning: tracking store {self.uri} is unreachable "
                          f"({self._last_error}); the trials go on and their results are "
                          f"written when it is back (waiting at most {self.max_outage:.0f} s)",
                          file=sys.stderr, flush=True)
                return False
            self._queue.pop(0)
        if self._down_since is not None:
            print(f"note: tracking store {self.uri} is back after "
                  f"{time.monotonic() - self._down_since:.0f} s; buffered results written",
                  file=sys.stderr, flush=True)
            self._down_since = None
        return True

    def _check_outage(self) -> None:
        if self._down_since is None or self.unreachable:
            return
        away = time.monotonic() - self._down_since
        if away <= self.max_outage:
            return
        self.unreachable = (f"tracking store {self.uri} unreachable for {away:.0f} s "
                            f"({self._last_error})")
        # Inside Tune's run, stop it as Ctrl-C does (trials saved, the rerun resumes); Tune's
        # handler is installed only then (the default action would kill the process).
        if signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, signal.SIG_IGN, None):
            os.kill(os.getpid(), signal.SIGUSR1)
