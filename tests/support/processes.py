"""Child processes: their environment, ports, servers, and stopping them by PID.

Tests run in two pytest-xdist workers at once (tests/conftest.py), so nothing here relies on
a port staying free after it was looked up: a server is started on a free port and started
again on another one if a different process took that port first (`serve`); a URI where
nothing may listen holds its port bound (`dead_port`). Processes are stopped by PID (their
session or their tree), never by name: the other worker's processes look the same.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable

import psutil

from .params import REPO


def child_env(**extra: str) -> dict:
    """This environment for a child process that imports the checkout (`PYTHONPATH`), on one
    intra-op thread, with `extra` variables."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **extra}


def free_port() -> int:
    """A TCP port of 127.0.0.1 that was free a moment ago. Give it to a server through `serve`,
    which starts the server again on another port if the port was taken meanwhile."""
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_ports(count: int) -> list[int]:
    """`count` different ports of 127.0.0.1 that were free a moment ago (as `free_port`)."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


@contextlib.contextmanager
def dead_port():
    """A port of 127.0.0.1 where nothing listens, and nothing can while the block runs: it is
    held bound (not listening), so a connection is refused at once and no other process
    (another test, another worker) can start a server there."""
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]
    finally:
        sock.close()


def listens(port: int, host: str = "127.0.0.1") -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
        return True
    return False


def tree(pid: int) -> list[psutil.Process]:
    """A process and all its descendants (empty if it is gone)."""
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    return []


def owns_port(pid: int, port: int) -> bool:
    """Whether the process `pid` or one of its descendants listens on `port`: that the server
    answering there is this one, not another worker's."""
    for proc in tree(pid):
        with contextlib.suppress(psutil.Error):
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
                    return True
    return False


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 120, what: str = "server",
              log: Path | None = None) -> None:
    """Return once `proc` (or a process it started) listens on `port`; fail naming `what` if it
    exits first (with the end of `log`) or does not listen within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            tail = Path(log).read_text(errors="replace")[-3000:] if log else ""
            raise AssertionError(f"{what} exited ({proc.returncode}) before listening on "
                                 f"{port}\n{tail}")
        if listens(port) and owns_port(proc.pid, port):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not listen on 127.0.0.1:{port} in {timeout:.0f} s")
        time.sleep(0.3)


PORT_TAKEN = re.compile(r"address already in use|connection in use|eaddrinuse|errno 98|"
                        r"port .* (is )?(already )?in use|failed to bind", re.I)


def serve(start: Callable[[int], subprocess.Popen], log: Path, *, what: str = "server",
          timeout: float = 240, tries: int = 5, port: int | None = None,
          ready: Callable[[int], bool] | None = None) -> tuple[subprocess.Popen, int]:
    """(process, port): `start(port)` on a free port (or `port`), once it listens there (and
    `ready(port)` holds, e.g. an HTTP health check). If the process ends saying that the port
    is in use (another process took it between the look-up and the bind), it is started again
    on another free port, up to `tries` times; any other early exit fails with its log."""
    for attempt in range(tries):
        chosen = port if port is not None else free_port()
        offset = Path(log).stat().st_size if Path(log).exists() else 0
        proc = start(chosen)
        deadline = time.monotonic() + timeout
        try:
            wait_port(chosen, proc, timeout, what)
            while ready is not None and not ready(chosen):
                assert proc.poll() is None and time.monotonic() < deadline, what
                time.sleep(0.5)
            return proc, chosen
        except AssertionError:
            stop(proc)
            text = Path(log).read_bytes()[offset:].decode(errors="replace")
            if PORT_TAKEN.search(text) and attempt + 1 < tries and port is None:
                continue
            raise AssertionError(f"{what} did not start on port {chosen}:\n{text[-3000:]}")
    raise AssertionError(f"{what}: every port tried was taken")


def error_lines(stderr: str) -> list[str]:
    """The error lines a stage wrote, from `error: ` on (Ray may add a notice about its auth
    mode; evaluate's progress bar, left open by the error, may precede one on its line); a
    traceback fails the test."""
    assert "Traceback" not in stderr, stderr[-3000:]
    return [line[line.index("error: "):] for line in stderr.splitlines() if "error: " in line]


def wait_for(condition: Callable[[], bool], timeout: float, what: str,
             proc: subprocess.Popen | None = None, every: float = 0.3) -> None:
    """Poll `condition` until it holds; fail naming `what` after `timeout` seconds, or at once
    if `proc` (the process that should make it hold) ends first."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc is None or proc.poll() is None, f"the process ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


def stop(proc: subprocess.Popen | None, grace: float = 0) -> None:
    """Stop a process started with `start_new_session=True` and everything in its session:
    SIGTERM and up to `grace` seconds to end (if `grace`), then SIGKILL; then reap it."""
    if proc is None or getattr(proc, "stopped_by_test", False):
        return
    proc.stopped_by_test = True          # once: its PID may be reused after it was reaped
    if grace and proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    # Also after the leader ended: workers of a server that outlived it.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def kill_tree(processes) -> None:
    """SIGKILL the given psutil processes (if still the same processes) and reap them."""
    alive = []
    for proc in processes:
        with contextlib.suppress(psutil.Error):
            proc.kill()
            alive.append(proc)
    psutil.wait_procs(alive, timeout=10)


def naming(folder: Path | str) -> list[psutil.Process]:
    """The processes whose command line names `folder` or a path inside it (e.g. Ray's daemons
    started with `--temp-dir=<folder>`, which leave the process group of the command that
    started them). `folder` is matched as a whole path, so a private folder of one test (made
    by mkdtemp) finds that test's processes and no other's."""
    pattern = re.compile(r"(?<![\w.-])" + re.escape(str(folder).rstrip("/")) + r"(?![\w.-])")
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error, TypeError):
            if proc.pid != os.getpid() and pattern.search(" ".join(proc.info["cmdline"] or ())):
                found.append(proc)
    return found
