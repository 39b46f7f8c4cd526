"""Fixtures every test module may use, and how the suite runs in two pytest-xdist workers.

The README's command runs the suite in two workers (`-n 2 --dist loadgroup`). Each worker:
- has its own sweep-state signing key (ECHO_STATE_KEY_FILE) and starts its own local Ray
  (RAY_ADDRESS=local: never the other worker's, nor one recorded in /tmp/ray);
- runs torch on one intra-op thread (OMP_NUM_THREADS=1 for what it starts): two workers share
  the machine's cores;
- runs Ray's workers at the niceness of everything else (RAY_worker_niceness=0; Ray's default
  15 starves a sweep's trials behind the other test worker while its driver, Ray's daemons and
  the test's own polling go on at full priority);
- is handed the slowest tests first (support.slow), so that the longest ones run side by side
  at the start instead of one after the other at the end. Tests whose module builds something
  expensive once (a trained model, a whole sweep) carry `xdist_group` marks: one worker runs
  them all and builds it once.
Shared helpers live in tests/support/; test modules never import each other.
"""
import functools
import http.server
import os
import threading
from pathlib import Path

import pytest

from support import slow
from support.params import REPO

XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if XDIST_WORKER:
    # Before torch is imported anywhere in this worker: its OpenMP pool is sized at import.
    os.environ["OMP_NUM_THREADS"] = "1"


def pytest_configure(config):
    if XDIST_WORKER:
        import torch
        torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """In an xdist worker: the slowest work first (support.slow). A group (`xdist_group`) is
    one unit of work, run by one worker, its tests kept together in their module's order."""
    if XDIST_WORKER:
        items[:] = slow.slowest_first(items)


@pytest.fixture(scope="session", autouse=True)
def isolated_worker(tmp_path_factory):
    """What two workers (or a developer's own sweeps) must not share: the key that signs sweep
    state (its own file per session, also for the drivers tests start), and a Ray instance
    (RAY_ADDRESS=local: ray.init starts a new local Ray, never joining another). Ray's workers
    run at normal priority (see the module's docstring)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ECHO_STATE_KEY_FILE", str(tmp_path_factory.getbasetemp() / "state.key"))
        if not os.environ.get("RAY_ADDRESS"):
            mp.setenv("RAY_ADDRESS", "local")
        mp.setenv("RAY_worker_niceness", "0")
        yield


def find_mnist_dir() -> Path | None:
    """The canonical MNIST IDX files: $ECHO_MNIST_DIR, else ../shared/data/mnist beside the repo."""
    candidates = [os.environ.get("ECHO_MNIST_DIR"), REPO.parent / "shared" / "data" / "mnist"]
    for c in candidates:
        if c and (Path(c) / "train-images-idx3-ubyte.gz").exists():
            return Path(c)
    return None


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    path = find_mnist_dir()
    if path is None:
        pytest.skip("real MNIST IDX files not found (set ECHO_MNIST_DIR)")
    return path


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: on a shared 2-core machine two threads contending with other jobs
    run these small networks several times slower than one (measured). Modules that want it
    for every test declare `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def http_server(tmp_path):
    """A local HTTP server (a data mirror) over tmp_path/'served' on 127.0.0.1; shut down
    however the test ends. Yields (served folder, base URL)."""
    served = tmp_path / "served"
    served.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=served))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield served, f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
