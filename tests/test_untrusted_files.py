"""Files the sweep reads that someone else may have written: the experiment state it signs
(and the key it signs with), crafted pickles in a (shared) experiment folder, hostile
checkpoints. Each is made for real: a real crafted pickle that would run a command when loaded,
two drivers making the signing key at the same moment. docs/reliability.md lists what each
proves."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from pipeline.sweep import experiment
from pipeline.sweep.experiment import state_key
from support import SWEEP, child_env
from support.params import write_sweep_params
from support.tracking import sweep_runs


def test_drivers_creating_the_state_key_at_once_read_one_whole_key(tmp_path, monkeypatch):
    """Two drivers that find no signing key at the same moment: each makes one, one key is kept,
    and both sign with it. The second driver, reading while the first is between creating the
    key file and writing it, used to read an empty file and stop ("not a state signing key")."""
    path = tmp_path / "config" / "sweep-state.key"
    real = experiment.secrets.token_hex
    seen: dict[str, bytes] = {}

    def token_hex(n: int) -> str:
        if n == 32 and "other" not in seen:        # the first driver, about to write its key
            seen["other"] = b""
            seen["other"] = state_key(path)        # a second driver starts right then
        return real(n)

    monkeypatch.setattr(experiment.secrets, "token_hex", token_hex)
    first = state_key(path)
    assert first == seen["other"] and len(first) == 32
    assert state_key(path) == first                            # kept, not remade
    assert [p.name for p in path.parent.iterdir()] == [path.name]   # no temporary file left
    assert path.stat().st_mode & 0o777 == 0o600


def test_a_damaged_state_key_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "sweep-state.key"
    path.write_text("not hex\n")
    with pytest.raises(experiment.SweepError, match="not a state signing key") as info:
        state_key(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


class _RunsCode:
    """Unpickling this runs a shell command (creates `marker`), as a crafted file would."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.slow
def test_crafted_pickles_in_the_experiment_folder_are_refused_and_never_run(tmp_path,
                                                                           monkeypatch, capsys):
    """A finished tiny sweep; then its `searcher-state-*.pkl`, then its `tuner.pkl`, replaced
    by a pickle that creates a file when loaded (the folder is shared, so anyone who can write
    there could). The rerun (which would resume) exits 1 in one line naming the file, before
    Ray starts; the file is never created, nothing new is trained or tracked. The same bytes
    unpickled directly do create it (the payload is real). A folder signed with another key is
    refused the same way."""
    import pickle

    import ray
    from stages.sweep import main as sweep_main
    monkeypatch.setenv("ECHO_STATE_KEY_FILE", str(tmp_path / "keys" / "state.key"))
    write_sweep_params(tmp_path, "shared", betas=[1.0], epochs=1)
    first = subprocess.run(SWEEP, cwd=tmp_path, env=child_env(), capture_output=True,
                           text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    experiment = tmp_path / "ray_results" / "shared"
    marker = tmp_path / "code-ran"
    monkeypatch.chdir(tmp_path)
    payload = pickle.dumps(_RunsCode(marker))
    _, _, children = sweep_runs(tmp_path / "mlflow.db", "shared")
    assert len(children) == 1

    for name in [next(experiment.glob("searcher-state-*.pkl")).name, "tuner.pkl"]:
        original = (experiment / name).read_bytes()
        (experiment / name).write_bytes(payload)
        assert sweep_main(["--params", "params.yaml"]) == 1
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and name in lines[0] and "not signed" in lines[0], lines
        assert not marker.exists(), "code from the experiment folder ran"
        assert not ray.is_initialized()                         # refused before Ray started
        (experiment / name).write_bytes(original)
    _, _, children = sweep_runs(tmp_path / "mlflow.db", "shared")
    assert len(children) == 1

    # Another key (e.g. a copied folder): refused, not loaded.
    (tmp_path / "keys" / "state.key").write_text(os.urandom(32).hex())
    assert sweep_main(["--params", "params.yaml"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "signature does not match" in lines[0], lines

    pickle.loads(payload)                                       # the payload does run
    assert marker.exists()


def test_hostile_checkpoint_refusal_names_the_reason(tmp_path):
    """The one-line refusal of a checkpoint holding code says what was refused, not torch's
    advice to load it with weights_only=False."""
    import torch
    from echo.train import load_checkpoint

    hostile = tmp_path / "model.pt"
    torch.save({"model": _RunsCode(tmp_path / "ran")}, hostile)
    with pytest.raises(ValueError) as info:
        load_checkpoint(hostile)
    message = str(info.value)
    assert "\n" not in message and str(hostile) in message
    assert "system" in message and "GLOBAL" in message, message
    assert "weights_only" not in message, message
    assert not (tmp_path / "ran").exists()

