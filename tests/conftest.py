import functools
import http.server
import os
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


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


def snapshot(folder: Path) -> set[str]:
    """Every path below `folder`, relative: compared before and after, it shows that a refused
    input left nothing behind."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


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
