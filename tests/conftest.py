import os
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
