"""Every download is verified against a checksum the data spec records, or refused.

MNIST's spec records the sha256 of each file's content (the canonical IDX bytes), computed from
the shared copy ($ECHO_MNIST_DIR). A real mirror (an HTTP server on 127.0.0.1) serving those
files is accepted; serving a tampered copy (one label changed, re-compressed) is refused in one
line naming the file, and nothing appears; a file the spec has no checksum for (the `.amat`
files, Omniglot) is refused before anything is downloaded."""
from __future__ import annotations

import dataclasses
import gzip
import os
import shutil
from pathlib import Path

import pytest

from echo import data
from echo.data import DataError
from echo.data.fetching import content_digest

MNIST_DIR = os.environ.get("ECHO_MNIST_DIR", "/work/shared/data/mnist")
SPEC = data.dataset_spec("mnist")


def _shared() -> Path:
    path = Path(MNIST_DIR)
    if not all((path / name).is_file() for name in SPEC.files):
        pytest.skip(f"the canonical MNIST files are not in {path} (set ECHO_MNIST_DIR)")
    return path


def test_mnist_spec_records_the_sha256_of_every_file_and_the_shared_copy_matches():
    shared = _shared()
    assert set(SPEC.sha256) == set(SPEC.files)
    for name, expected in SPEC.sha256.items():
        assert content_digest(shared / name) == expected, name


def test_canonical_files_are_downloaded_and_a_tampered_copy_is_refused(tmp_path, http_server,
                                                                       monkeypatch):
    shared = _shared()
    served, url = http_server
    labels = "t10k-labels-idx1-ubyte.gz"
    # The tampered mirror: the test labels with one label changed, re-compressed (a valid gzip
    # of a valid IDX file: only the checksum can tell).
    (served / "bad").mkdir()
    for name in SPEC.files:
        shutil.copy(shared / name, served / "bad" / name)
    raw = bytearray(gzip.decompress((shared / labels).read_bytes()))
    raw[8] = (raw[8] + 1) % 10
    (served / "bad" / labels).write_bytes(gzip.compress(bytes(raw)))
    # A mirror with the canonical files.
    (served / "good").mkdir()
    for name in SPEC.files:
        shutil.copy(shared / name, served / "good" / name)

    dest = tmp_path / "tampered"
    with pytest.raises(DataError) as err:
        data.fetch_all(dict(SPEC.files), [url + "bad/"], dest, dict(SPEC.sha256))
    message = str(err.value)
    assert "\n" not in message
    assert labels in message and SPEC.sha256[labels] in message
    assert "different or damaged" in message and f"place the canonical file in {dest}/" in message
    assert not (dest / labels).exists() and not list(dest.glob("*.tmp"))    # nothing appears

    # Through the loader: the tampered mirror first, the canonical one next: the sweep's data
    # comes from the verified files only.
    monkeypatch.setitem(data.REGISTRY, "mnist",
                        dataclasses.replace(SPEC, mirrors=(url + "bad/", url + "good/")))
    root = tmp_path / "raw"
    x, y = data.load_dataset("mnist", "test", root, download=True)
    assert len(y) == 10_000
    for name in SPEC.files:
        assert (root / "mnist" / name).read_bytes() == (shared / name).read_bytes(), name


def test_a_file_without_a_recorded_checksum_is_never_downloaded(tmp_path, http_server, monkeypatch):
    served, url = http_server
    (served / "chardata.mat").write_bytes(b"anything")
    spec = dataclasses.replace(data.dataset_spec("omniglot"), mirrors=(url,))
    monkeypatch.setitem(data.REGISTRY, "omniglot", spec)
    root = tmp_path / "raw"
    with pytest.raises(DataError) as err:
        data.load_dataset("omniglot", "test", root, download=True)
    message = str(err.value)
    assert "\n" not in message
    assert "chardata.mat: the data spec records no checksum" in message
    assert "record its sha256" in message and str(root / "omniglot") in message
    assert not (root / "omniglot" / "chardata.mat").exists()
    # Also straight through fetch: refused before anything is downloaded.
    with pytest.raises(DataError, match="records no checksum"):
        data.fetch(url + "chardata.mat", tmp_path / "direct" / "chardata.mat")
    assert not (tmp_path / "direct").exists()


def test_every_registered_download_has_a_checksum_or_is_refused(tmp_path, monkeypatch):
    """Each registered data set: every file it could download has a sha256 or md5 in its spec,
    or `download` refuses it without touching the network (urlopen is replaced by a failure)."""
    import urllib.request

    def no_network(*args, **kwargs):
        raise AssertionError("a file without a checksum reached the network")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    for name in data.dataset_names():
        spec = data.dataset_spec(name)
        unverified = [f for f, md5 in spec.files.items() if md5 is None and f not in spec.sha256]
        if not spec.files or not unverified:
            continue
        with pytest.raises(DataError, match="records no checksum"):
            data.download(spec, tmp_path / name)


def test_binary_mnist_amat_files_are_verified_against_their_recorded_sha256(tmp_path, http_server):
    """The Larochelle & Murray .amat files (the paper's data) carry the sha256 that TensorFlow
    Datasets records for the same mirror: a mirror serving anything else is refused in one
    line naming the file and both digests, and nothing appears."""
    served, url = http_server
    spec = dataclasses.replace(data.dataset_spec("binary_mnist"), mirrors=(url,))
    assert set(spec.sha256) == set(spec.files)               # every .amat file has one
    for name in spec.files:
        (served / name).write_text("0 1 " * 392 + "\n")       # a well-formed but wrong file
    with pytest.raises(DataError) as err:
        data.download(spec, tmp_path / "binary_mnist")
    message = str(err.value)
    assert "\n" not in message and ".amat" in message
    assert any(spec.sha256[name] in message for name in spec.files), message
    assert not list((tmp_path / "binary_mnist").glob("*.amat"))
