"""Files the sweep reads that someone else may have written or damaged: the experiment state it
signs (and the key it signs with), crafted pickles, hostile checkpoints. Each is made for real:
a real crafted pickle that would create a file, a real damaged checkpoint. docs/reliability.md
lists what each proves."""
from __future__ import annotations

import pytest

from pipeline.sweep import experiment
from pipeline.sweep.experiment import state_key


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
