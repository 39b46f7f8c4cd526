"""The prepare stage: npz + manifest written atomically and reproducibly, verified by later
stages, and `python -m stages.prepare` run as DVC runs it (a subprocess) on digits, on the real
MNIST files and on bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from echo.data import (DataError, check_prepared, file_digest, load_prepared, manifest_path,
                       prepare)
from support import REPO
from support.data_files import fake_mnist, write_amat_dir, write_chardata, write_mnist_dir



def run_stage(cwd: Path, params: str) -> subprocess.CompletedProcess:
    (cwd / "params.yaml").write_text(params)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "stages.prepare", "--params", "params.yaml"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_prepare_digits_writes_npz_and_manifest(tmp_path):
    manifest = prepare("digits", tmp_path / "raw", tmp_path / "prepared", download=False)
    npz_path = tmp_path / "prepared" / "digits.npz"
    assert json.loads(manifest_path(npz_path).read_text()) == manifest
    with np.load(npz_path) as npz:
        assert sorted(npz.files) == sorted(f"{s}_{k}" for s in ("train", "valid", "test")
                                           for k in ("x", "y"))
        for split, info in manifest["splits"].items():
            x = npz[f"{split}_x"]
            assert list(x.shape) == info["shape"] and x.dtype == np.uint8
            assert info["pixel_mean"] == pytest.approx(x.mean(), abs=1e-6) and info["binary"]
            assert sum(info["label_counts"]) == info["n"]
    assert manifest["prepared"]["sha256"] == file_digest(npz_path)
    assert manifest["binarization_seed"] == 0 and "seed 0" in manifest["variant"]
    assert "default_rng(seed + i)" in manifest["binarization_rule"]
    assert manifest["raw_files"] == [] and "scikit-learn" in manifest["source"]
    assert check_prepared(npz_path) == manifest
    assert sorted(p.name for p in npz_path.parent.iterdir()) == ["digits.manifest.json", "digits.npz"]


def test_prepared_file_is_byte_reproducible(tmp_path):
    first = prepare("digits", tmp_path, tmp_path / "a", download=False)
    second = prepare("digits", tmp_path, tmp_path / "b", download=False)
    other_seed = prepare("digits", tmp_path, tmp_path / "c", download=False, seed=1)
    assert first["prepared"]["sha256"] == second["prepared"]["sha256"]
    assert first["prepared"]["sha256"] != other_seed["prepared"]["sha256"]


def test_changed_or_damaged_prepared_data_is_refused(tmp_path):
    prepare("digits", tmp_path, tmp_path, download=False)
    npz_path = tmp_path / "digits.npz"
    x, y = load_prepared(npz_path, "test")
    assert x.shape == (360, 1, 8, 8) and len(y) == 360
    raw = bytearray(npz_path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    npz_path.write_bytes(bytes(raw))
    for check in (lambda: check_prepared(npz_path), lambda: load_prepared(npz_path, "train")):
        with pytest.raises(DataError, match="does not match digits.manifest.json") as err:
            check()
        assert str(npz_path) in str(err.value) and "\n" not in str(err.value)
    manifest_path(npz_path).write_text("{not json")
    with pytest.raises(DataError, match="not a valid manifest"):
        check_prepared(npz_path)
    manifest_path(npz_path).unlink()
    with pytest.raises(DataError, match="missing manifest"):
        check_prepared(npz_path)


def test_hand_written_npz_without_manifest_still_loads_but_garbage_does_not(tmp_path):
    path = tmp_path / "own.npz"
    np.savez(path, train_x=np.zeros((4, 1, 2, 2), np.float32), train_y=np.zeros(4, np.int64))
    assert load_prepared(path, "train")[0].shape == (4, 1, 2, 2)
    with pytest.raises(DataError, match="no split 'test'"):
        load_prepared(path, "test")
    path.write_bytes(b"not a zip file")
    with pytest.raises(DataError, match="not a readable .npz"):
        load_prepared(path, "train")
    with pytest.raises(DataError, match="run `python -m stages.prepare` first"):
        load_prepared(tmp_path / "absent.npz", "train")


def test_prepare_each_raw_format_from_tiny_files(tmp_path):
    write_mnist_dir(tmp_path / "fashion_mnist", fake_mnist(n_train=18, seed=3))
    write_amat_dir(tmp_path / "binary_mnist")
    write_chardata(tmp_path / "omniglot" / "chardata.mat")
    expected = {"fashion_mnist": (15, 3, 6), "binary_mnist": (5, 3, 4), "omniglot": (7, 0, 4)}
    for name, sizes in expected.items():
        manifest = prepare(name, tmp_path, tmp_path / "prepared", download=False, check_sizes=False)
        assert tuple(manifest["splits"][s]["n"] for s in ("train", "valid", "test")) == sizes
        assert all(len(f["sha256"]) == 64 for f in manifest["raw_files"]) and manifest["raw_files"]
        x, _ = load_prepared(tmp_path / "prepared" / f"{name}.npz", "test")
        assert x.shape == (sizes[2], 1, 28, 28) and 0 <= float(x.min()) <= float(x.max()) <= 1


def test_failed_prepare_leaves_earlier_outputs_untouched_and_no_temporaries(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "prepared"
    write_mnist_dir(raw / "mnist")
    prepare("mnist", raw, out, download=False, check_sizes=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    images = raw / "mnist" / "t10k-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:-20])                  # truncated gzip
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz"):
        prepare("mnist", raw, out, download=False, check_sizes=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_stage_prepares_digits(tmp_path):
    result = run_stage(tmp_path, "data:\n  dataset: digits\n  prepared_dir: out\n")
    assert result.returncode == 0, result.stderr
    assert "prepared digits" in result.stdout and "train 1,257" in result.stdout
    manifest = check_prepared(tmp_path / "out" / "digits.npz")
    assert manifest["splits"]["test"]["n"] == 360


def test_stage_prepares_binary_mnist_from_the_real_files(tmp_path, mnist_dir):
    result = run_stage(tmp_path, f"data:\n  dataset: binary_mnist\n  raw_dir: {mnist_dir}\n"
                                 f"  prepared_dir: out\n  download: false\n")
    assert result.returncode == 0, result.stderr
    assert "static binarization of MNIST with seed 0" in result.stderr   # announced
    manifest = check_prepared(tmp_path / "out" / "binary_mnist.npz")
    assert manifest["variant"] == "binary_mnist: static binarization of MNIST, seed 0"
    assert [manifest["splits"][s]["n"] for s in ("train", "valid", "test")] == [50_000, 10_000, 10_000]
    assert manifest["splits"]["test"]["label_counts"] == [980, 1135, 1032, 1010, 982, 892, 958,
                                                         1028, 974, 1009]
    assert all(manifest["splits"][s]["binary"] for s in ("train", "valid", "test"))
    assert 0.12 < manifest["splits"]["train"]["pixel_mean"] < 0.14
    recorded = {Path(f["path"]).name: f["sha256"] for f in manifest["raw_files"]}
    assert recorded == {p.name: file_digest(p) for p in mnist_dir.glob("*-ubyte.gz")}


def test_stage_bad_input_exits_nonzero_with_one_line_and_no_output(tmp_path, monkeypatch, capsys):
    # In-process (the subprocess path is covered above): main() is what `python -m` runs.
    from stages.prepare import main
    monkeypatch.chdir(tmp_path)
    raw = tmp_path / "raw"
    write_mnist_dir(raw)
    labels = raw / "train-labels-idx1-ubyte.gz"
    labels.write_bytes(b"\x00\x00\x08\x03" + labels.read_bytes()[4:])   # not gzip, wrong dims
    (tmp_path / "params.yaml").write_text("data:\n  dataset: mnist\n  raw_dir: raw\n  prepared_dir: out\n"
                                          "  download: false\n  check_sizes: false\n")
    assert main([]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "\n" not in error
    assert str(labels.relative_to(tmp_path)) in error and "swapped" in error
    assert not (tmp_path / "out").exists()

    (tmp_path / "bad.yaml").write_text("data:\n  dataset: mnist\n  binarization_seed: -1\n")
    assert main(["--params", "bad.yaml"]) == 2
    assert "data.binarization_seed" in capsys.readouterr().err


def test_stage_names_the_params_fields_where_the_library_names_its_arguments(tmp_path, monkeypatch,
                                                                             capsys):
    """The library's fix reads `check_sizes=False` / `download=False` / `root=...`; the stage says
    the same with the params.yaml fields (data.check_sizes, data.download, data.raw_dir)."""
    from stages.prepare import main
    monkeypatch.chdir(tmp_path)
    write_mnist_dir(tmp_path / "raw" / "mnist")                     # 12 images, not 60,000
    with pytest.raises(DataError, match="check_sizes=False") as err:
        prepare("mnist", tmp_path / "raw", tmp_path / "out", download=False)
    assert err.value.arguments == {"check_sizes": False}
    (tmp_path / "params.yaml").write_text("data:\n  dataset: mnist\n  raw_dir: raw\n  prepared_dir: out\n"
                                          "  download: false\n")
    assert main([]) == 1
    error = capsys.readouterr().err.strip()
    assert "set data.check_sizes: false for a custom subset" in error and "check_sizes=" not in error

    (tmp_path / "empty.yaml").write_text("data:\n  dataset: omniglot\n  raw_dir: nowhere\n"
                                         "  prepared_dir: out\n  download: false\n")
    assert main(["--params", "empty.yaml"]) == 1
    error = capsys.readouterr().err.strip()
    assert "(data.raw_dir: nowhere)" in error and "downloads are off (data.download: false)" in error
    assert "download=" not in error and "root=" not in error and "\n" not in error
    assert not (tmp_path / "out").exists()
