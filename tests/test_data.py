"""The data layer: raw format readers against files written here, every bad-input case, the
real MNIST files, binarization statistics, and downloads from a local HTTP server."""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from echo import data
from echo.data import DataError, load_dataset, load_splits, read_amat, read_idx
from support.data_files import (amat_text, column_major, fake_mnist, idx_bytes, write_amat_dir,
                                write_chardata, write_idx, write_mnist_dir)

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


# --- IDX ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["images-idx3-ubyte.gz", "images-idx3-ubyte"])
def test_read_idx_round_trip_gzipped_or_plain(tmp_path, name):
    images = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    assert np.array_equal(read_idx(write_idx(tmp_path / name, images), ndim=3), images)


def test_gzip_is_detected_from_the_bytes_not_the_name(tmp_path):
    labels = np.arange(10, dtype=np.uint8)
    path = tmp_path / "labels-idx1-ubyte"            # no .gz suffix, gzipped content
    path.write_bytes(gzip.compress(idx_bytes(labels)))
    assert np.array_equal(read_idx(path), labels)


@pytest.mark.parametrize("damage, expected", [
    (lambda raw: b"\x00\x00\x09" + raw[3:], "bad magic number"),            # signed-byte type
    (lambda raw: b"PK\x03\x04" + raw[4:], "bad magic number"),               # not IDX at all
    (lambda raw: raw[:-100], "truncated or corrupt"),                        # cut short
    (lambda raw: raw + b"\x00", "truncated or corrupt"),                     # trailing bytes
    (lambda raw: raw[:10], "truncated IDX header"),
    (lambda raw: b"", "bad magic number"),
])
def test_damaged_idx_files_name_file_and_expectation(tmp_path, damage, expected):
    raw = idx_bytes(np.zeros((2, 28, 28), dtype=np.uint8))
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(damage(raw))
    with pytest.raises(DataError) as err:
        read_idx(path, ndim=3)
    assert str(path) in one_line(err) and expected in str(err.value)


def test_truncated_and_corrupted_gzip(tmp_path):
    compressed = gzip.compress(idx_bytes(np.random.default_rng(0).integers(
        0, 256, (20, 28, 28), dtype=np.uint8)))
    truncated = tmp_path / "truncated.gz"
    truncated.write_bytes(compressed[: len(compressed) // 2])
    flipped = bytearray(compressed)
    flipped[len(flipped) // 2] ^= 0xFF                 # damages the deflate stream or its CRC
    corrupted = tmp_path / "corrupted.gz"
    corrupted.write_bytes(bytes(flipped))
    for path in (truncated, corrupted):
        with pytest.raises(DataError) as err:
            read_idx(path)
        assert str(path) in one_line(err) and "truncated or corrupt" in str(err.value)


def test_labels_where_images_are_expected_is_reported_as_swapped(tmp_path):
    path = write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros(5, dtype=np.uint8))
    with pytest.raises(DataError, match="swapped") as err:
        read_idx(path, ndim=3)
    assert "2049" in one_line(err) and "2051" in str(err.value)


def mnist_root(tmp_path, **kwargs) -> tuple[Path, dict]:
    root = tmp_path / "raw"
    return root, write_mnist_dir(root / "mnist", **kwargs)


def test_mnist_from_idx_files_splits_and_scales(tmp_path):
    root, parts = mnist_root(tmp_path)
    d = load_splits("mnist", root, check_sizes=False)
    train_images, train_labels = parts["train"]
    cut = len(train_images) - len(train_images) // 6     # 10,000 of 60,000 for the real files
    x, y = d.splits["train"]
    assert x.shape == (cut, 1, 28, 28) and x.dtype == np.float32
    assert np.allclose(x[:, 0] * 255, train_images[:cut]) and np.array_equal(y, train_labels[:cut])
    xv, yv = d.splits["valid"]
    assert np.allclose(xv[:, 0] * 255, train_images[cut:]) and np.array_equal(yv, train_labels[cut:])
    xt, yt = d.splits["test"]
    assert np.allclose(xt[:, 0] * 255, parts["test"][0]) and np.array_equal(yt, parts["test"][1])
    assert "grey levels" in d.variant


@pytest.mark.parametrize("layout", ["mnist", "MNIST/raw", "."])
def test_mnist_layouts(tmp_path, layout):
    root = tmp_path / "raw"
    parts = write_mnist_dir(root / layout, gz=layout != ".")
    x, y = load_dataset("mnist", "test", root, check_sizes=False)
    assert isinstance(x, torch.Tensor) and x.dtype == torch.float32
    assert np.array_equal(y.numpy(), parts["test"][1])


def test_fashion_mnist_does_not_pick_up_mnist_files_in_the_root(tmp_path):
    root = tmp_path / "raw"
    write_mnist_dir(root)                                 # MNIST files directly in the root
    with pytest.raises(DataError) as err:
        load_dataset("fashion_mnist", "train", root)
    assert "fashion_mnist" in one_line(err) and str(root / "fashion_mnist") in str(err.value)
    parts = write_mnist_dir(root / "FashionMNIST" / "raw", fake_mnist(seed=5))
    x, _ = load_dataset("fashion_mnist", "test", root, check_sizes=False)
    assert np.allclose(x[:, 0].numpy() * 255, parts["test"][0])


def test_missing_files_say_which_files_go_where(tmp_path):
    with pytest.raises(DataError) as err:
        load_dataset("mnist", "train", tmp_path)
    message = one_line(err)
    for name in ("train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", str(tmp_path / "mnist"),
                 "downloads are off"):
        assert name in message
    # the fix names the library's arguments (a caller restates them in its own terms)
    assert f"root={str(tmp_path)!r}" in message and "download=False" in message
    assert err.value.arguments == {"root": str(tmp_path), "download": False}
    assert "data." not in message and "params" not in message
    assert "(raw: " in err.value.rephrased({"root": "raw"}, lambda name, value: f"{name}: {value}")


def test_binary_mnist_without_amat_or_mnist_names_both_options(tmp_path):
    with pytest.raises(DataError) as err:
        load_dataset("binary_mnist", "test", tmp_path)
    message = one_line(err)
    assert "binarized_mnist_{train,valid,test}.amat" in message
    assert "t10k-images-idx3-ubyte.gz" in message and str(tmp_path / "mnist") in message
    assert err.value.arguments == {"root": str(tmp_path), "download": False}   # kept from MNIST's


def test_canonical_sizes_are_enforced_unless_turned_off(tmp_path):
    root, _ = mnist_root(tmp_path)
    with pytest.raises(DataError, match="canonical file has 60000") as err:
        load_dataset("mnist", "train", root)
    assert "train-images-idx3-ubyte.gz" in one_line(err) and "check_sizes" in str(err.value)
    assert "check_sizes=False" in str(err.value) and err.value.arguments == {"check_sizes": False}
    assert len(load_dataset("mnist", "train", root, check_sizes=False)[0]) == 10


@pytest.mark.parametrize("parts, file, expected", [
    ({"train": (np.zeros((4, 28, 28), np.uint8), np.zeros(3, np.uint8))},
     "train-labels-idx1-ubyte.gz", "3 labels but train-images-idx3-ubyte.gz has 4 images"),
    ({"train": (np.zeros((4, 20, 20), np.uint8), np.zeros(4, np.uint8))},
     "train-images-idx3-ubyte.gz", "expected 28x28"),
    ({"train": (np.zeros((4, 28, 28), np.uint8), np.full(4, 12, np.uint8))},
     "train-labels-idx1-ubyte.gz", "expected 0..9"),
])
def test_inconsistent_image_label_pairs(tmp_path, parts, file, expected):
    parts = {**fake_mnist(), **parts}
    root, _ = mnist_root(tmp_path, parts=parts)
    with pytest.raises(DataError) as err:
        load_dataset("mnist", "train", root, check_sizes=False)
    assert str(root / "mnist" / file) in one_line(err) and expected in str(err.value)


def test_real_mnist_has_canonical_sizes_and_label_counts(mnist_dir):
    d = load_splits("mnist", mnist_dir)               # real files sit directly in the dir
    train_labels = np.concatenate([d.splits["train"][1], d.splits["valid"][1]])
    assert len(train_labels) == 60_000 and len(d.splits["test"][1]) == 10_000
    assert np.bincount(train_labels).tolist() == MNIST_TRAIN_COUNTS
    assert np.bincount(d.splits["test"][1]).tolist() == MNIST_TEST_COUNTS
    assert [len(d.splits[s][0]) for s in ("train", "valid", "test")] == [50_000, 10_000, 10_000]
    x = d.splits["test"][0]
    assert x.min() == 0.0 and x.max() == 1.0 and 0.12 < x.mean() < 0.14   # MNIST's mean intensity


# --- binary MNIST: .amat and the fallback --------------------------------------------------------

def test_binary_mnist_reads_larochelle_amat_files(tmp_path):
    bits = write_amat_dir(tmp_path / "binary_mnist")
    d = load_splits("binary_mnist", tmp_path, check_sizes=False)
    assert "Larochelle & Murray" in d.variant and d.binarization_seed is None
    for split, expected in bits.items():
        x, y = d.splits[split]
        assert np.array_equal(x[:, 0], expected) and (y == -1).all()


def test_amat_slow_path_accepts_numeric_tokens(tmp_path):
    bits = (np.random.default_rng(3).random((2, 784)) < 0.5).astype(int)
    path = tmp_path / "x.amat"
    path.write_text("".join(" ".join(f"{v}.0" for v in row) + "\n" for row in bits))
    assert np.array_equal(read_amat(path), bits)


@pytest.mark.parametrize("edit, expected", [
    (lambda t: t[: len(t) - 700], "line 3: 434 values, expected 784"),       # cut mid-line
    (lambda t: t.replace("1", "2", 1), "expected 0 or 1"),
    (lambda t: t.replace("0", "x", 1), "expected 0 or 1"),
    (lambda t: "", "empty"),
])
def test_damaged_amat_files(tmp_path, edit, expected):
    bits = (np.random.default_rng(4).random((3, 784)) < 0.5).astype(np.uint8)
    bits[0, :10] = [0, 1] * 5
    path = tmp_path / "binarized_mnist_valid.amat"
    path.write_text(edit(amat_text(bits)))
    with pytest.raises(DataError) as err:
        read_amat(path)
    assert str(path) in one_line(err) and expected in str(err.value)


def test_amat_canonical_counts(tmp_path):
    write_amat_dir(tmp_path)
    with pytest.raises(DataError, match="5 images, the canonical file has 50000"):
        load_dataset("binary_mnist", "train", tmp_path)


def test_binary_mnist_falls_back_to_seeded_binarization_of_mnist(tmp_path, caplog):
    root, parts = mnist_root(tmp_path, parts=fake_mnist(n_train=60, n_test=30))
    d = load_splits("binary_mnist", root, check_sizes=False, seed=3)
    assert d.variant == "binary_mnist: static binarization of MNIST, seed 3"
    assert d.binarization_seed == 3 and "static binarization of MNIST" in caplog.text
    again = load_splits("binary_mnist", root, check_sizes=False, seed=3)
    other = load_splits("binary_mnist", root, check_sizes=False, seed=4)
    x = d.splits["test"][0]
    assert set(np.unique(x)) <= {0, 1}
    assert np.array_equal(x, again.splits["test"][0]) and not np.array_equal(x, other.splits["test"][0])
    # The draw is Bernoulli(intensity): black pixels stay 0, white ones 1.
    grey = parts["test"][0]
    assert (x[:, 0][grey == 0] == 0).all() and (x[:, 0][grey == 255] == 1).all()


# --- Omniglot (.mat) -----------------------------------------------------------------------------

def test_omniglot_column_major_layout_matches_burda(tmp_path):
    written = write_chardata(tmp_path / "omniglot" / "chardata.mat")
    parts = data.read_omniglot_mat(tmp_path / "omniglot" / "chardata.mat", check_sizes=False)
    for split in ("train", "test"):
        images, labels = parts[split]
        assert np.allclose(images, written["images"][split])
        assert np.array_equal(labels, written["labels"][split])
    # Burda et al.'s loader: data.T.reshape((-1, 28, 28)).reshape((-1, 784), order='fortran'),
    # then rows read as row-major 28x28 images.
    matrix = column_major(written["images"]["train"])
    burda = matrix.T.reshape((-1, 28, 28)).reshape((-1, 784), order="F").reshape(-1, 28, 28)
    assert np.array_equal(data.omniglot_images(matrix), burda)
    assert not np.allclose(matrix.T.reshape(-1, 28, 28), burda)   # the naive reshape transposes


def test_omniglot_is_binarized_with_a_recorded_seed_and_has_no_valid_split(tmp_path):
    written = write_chardata(tmp_path / "chardata.mat", n_train=40)
    d = load_splits("omniglot", tmp_path, check_sizes=False, seed=7)
    assert d.binarization_seed == 7 and "seed 7" in d.variant
    x, y = d.splits["train"]
    assert x.shape == (40, 1, 28, 28) and x.dtype == np.uint8 and set(np.unique(x)) <= {0, 1}
    assert np.array_equal(y, written["labels"]["train"])
    assert d.splits["valid"][0].shape == (0, 1, 28, 28)
    # Pixels are Bernoulli(intensity): the binary mean tracks the intensities' mean.
    p = written["images"]["train"]
    assert abs(x.mean() - p.mean()) < 5 * np.sqrt(0.25 / p.size)


@pytest.mark.parametrize("override, expected", [
    ({"testdata": None}, "no variable 'testdata'"),
    ({"data": np.zeros((7, 784))}, "has shape (7, 784), expected 784 x N"),
    ({"data": np.full((784, 7), 2.0)}, "values outside [0, 1]"),
    ({"target": np.zeros((50, 3))}, "'target' has shape (50, 3)"),
])
def test_malformed_chardata(tmp_path, override, expected):
    path = tmp_path / "chardata.mat"
    write_chardata(path, **override)
    with pytest.raises(DataError) as err:
        data.read_omniglot_mat(path, check_sizes=False)
    assert str(path) in one_line(err) and expected in str(err.value)


def test_truncated_chardata_and_canonical_counts(tmp_path):
    path = tmp_path / "chardata.mat"
    write_chardata(path)
    with pytest.raises(DataError, match="canonical file has 24345"):
        data.read_omniglot_mat(path)
    path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(DataError) as err:
        data.read_omniglot_mat(path, check_sizes=False)
    assert str(path) in one_line(err) and "truncated or corrupt" in str(err.value)


# --- binarization and digits -----------------------------------------------------------------------

def test_binarize_is_bernoulli_of_the_intensity_and_chunk_independent():
    p = np.random.default_rng(0).random((300, 28, 28))
    a = data.binarize(p, seed=11)
    assert np.array_equal(a, data.binarize(p, seed=11, chunk=7))
    assert not np.array_equal(a, data.binarize(p, seed=12))
    # P(pixel = 1) = p: within 5 standard errors over 235,200 pixels, and pixel-wise correlated.
    assert abs(a.mean() - p.mean()) < 5 * np.sqrt(0.25 / p.size)
    assert a[p > 0.9].mean() > 0.85 and a[p < 0.1].mean() < 0.15


def test_digits_split_is_fixed_binary_and_covers_every_image():
    import sklearn
    from sklearn.datasets import load_digits
    from echo.data.sets.digits import _sklearn_digits
    # The bundled file read directly (without importing scikit-learn) is load_digits' data.
    images, target, version = _sklearn_digits()
    bunch = load_digits()
    assert np.array_equal(images, bunch.images) and images.dtype == bunch.images.dtype
    assert np.array_equal(target, bunch.target) and version == sklearn.__version__
    d = load_splits("digits")
    sizes = {s: len(d.splits[s][0]) for s in ("train", "valid", "test")}
    assert sizes == {"train": 1257, "valid": 180, "test": 360}
    labels = np.concatenate([d.splits[s][1] for s in ("train", "valid", "test")])
    assert np.array_equal(np.bincount(labels), np.bincount(load_digits().target))
    x, y = load_dataset("digits", "valid")
    assert x.shape == (180, 1, 8, 8) and set(x.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(x, load_dataset("digits", "valid")[0])
    assert not torch.equal(x, load_dataset("digits", "valid", seed=1)[0])


def test_unknown_names_and_splits():
    with pytest.raises(ValueError, match="unknown dataset 'cifar'"):
        load_dataset("cifar")
    with pytest.raises(ValueError, match="split must be one of"):
        load_dataset("digits", "dev")


# --- downloads ---------------------------------------------------------------------------------------

def test_fetch_all_verifies_md5_and_falls_back_to_the_next_mirror(tmp_path, http_server):
    served, url = http_server
    (served / "good").mkdir()
    payload = b"some raw bytes" * 100
    (served / "good" / "file.gz").write_bytes(payload)
    md5 = hashlib.md5(payload).hexdigest()
    dest = tmp_path / "raw"
    data.fetch_all({"file.gz": md5}, [url + "missing/", url + "good/"], dest)   # 404, then OK
    assert (dest / "file.gz").read_bytes() == payload

    with pytest.raises(DataError, match="expected 0123") as err:
        data.fetch_all({"file.gz": "0123" + md5[4:]}, [url + "good/"], tmp_path / "other")
    assert "could not download file.gz" in one_line(err)
    assert list((tmp_path / "other").iterdir()) == []         # no partial or unverified file


def test_missing_mnist_is_downloaded_from_a_mirror_and_loaded(tmp_path, http_server, monkeypatch):
    served, url = http_server
    parts = write_mnist_dir(served)
    md5s = {f.name: hashlib.md5(f.read_bytes()).hexdigest() for f in served.iterdir()}
    mirrored = dataclasses.replace(data.dataset_spec("mnist"), mirrors=(url,), files=md5s,
                                   sha256={}, torchvision=None)    # tiny files: md5s only
    monkeypatch.setitem(data.REGISTRY, "mnist", mirrored)
    root = tmp_path / "raw"
    with pytest.raises(DataError, match="downloads are off"):
        load_dataset("mnist", "test", root, check_sizes=False)
    x, y = load_dataset("mnist", "test", root, download=True, check_sizes=False)
    assert np.array_equal(y.numpy(), parts["test"][1])
    assert sorted(p.name for p in (root / "mnist").iterdir()) == sorted(md5s)


def test_failed_download_names_the_files_and_the_reason(tmp_path, http_server, monkeypatch):
    _, url = http_server
    # A data set whose files have recorded checksums (omniglot's have none: refused before any
    # download, tests/test_data_checksums.py), on a mirror that has none of them.
    offline = dataclasses.replace(data.dataset_spec("mnist"), mirrors=(url + "nothing-here/",))
    monkeypatch.setitem(data.REGISTRY, "mnist", offline)
    with pytest.raises(DataError) as err:
        load_dataset("mnist", "train", tmp_path / "raw", download=True)
    message = one_line(err)
    assert "idx3-ubyte.gz" in message and "download failed" in message and "404" in message


# --- the registry ------------------------------------------------------------------------------

def test_every_data_set_is_one_registered_spec():
    assert set(data.DATASETS) == {"binary_mnist", "mnist", "fashion_mnist", "omniglot", "digits",
                                  "binary_source", "gaussian_source", "user_npz"}
    for name in data.DATASETS:
        spec = data.dataset_spec(name)
        assert spec.name == name and callable(spec.loader)
        assert set(spec.sizes) <= set(data.SPLITS)
        assert bool(spec.files) == bool(spec.mirrors) == bool(spec.search_dirs)   # digits: none
    with pytest.raises(ValueError, match="registered twice"):
        data.register(data.dataset_spec("mnist"))
    with pytest.raises(DataError, match="unknown dataset 'mnsit'"):
        load_splits("mnsit")


def test_a_new_idx_data_set_is_one_spec(tmp_path, monkeypatch):
    """What docs/data.md's how-to registers: an MNIST-format set needs only its spec."""
    monkeypatch.setattr(data.registry, "REGISTRY", dict(data.REGISTRY))
    data.register(data.DatasetSpec(name="kmnist", pretty="Kuzushiji-MNIST",
                                   loader=data.idx_grey_levels, files=data.idx_files((None,) * 4),
                                   sizes={"train": 60_000, "test": 10_000},
                                   mirrors=("http://127.0.0.1:9/",), search_dirs=("kmnist",)))
    parts = write_mnist_dir(tmp_path / "kmnist", fake_mnist(seed=9))
    d = load_splits("kmnist", tmp_path, check_sizes=False)
    assert d.variant == "kmnist: Kuzushiji-MNIST grey levels in [0, 1] from the IDX files"
    assert np.allclose(d.splits["test"][0][:, 0] * 255, parts["test"][0])
    with pytest.raises(DataError, match="canonical file has 60000"):
        load_splits("kmnist", tmp_path)
