"""Folder snapshots, and the per-epoch histories a trial's checkpoints hold."""
from __future__ import annotations

import re
from pathlib import Path


def snapshot(folder: Path) -> set[str]:
    """Every path below `folder`, relative: compared before and after, it shows that a refused
    input left nothing behind."""
    return {str(p.relative_to(folder)) for p in Path(folder).rglob("*")}


def _index(checkpoint: Path) -> int:
    found = re.search(r"(\d+)$", checkpoint.name)
    return int(found.group(1)) if found else -1


def trial_checkpoints(experiment: Path, prefix: str = "vae_") -> dict[str, list[Path]]:
    """trial folder name -> its checkpoint folders (oldest first) in a Tune experiment folder."""
    return {t.name: sorted(t.glob("checkpoint_*"), key=_index)
            for t in Path(experiment).glob(f"{prefix}*") if t.is_dir()}


def newest_history(trial_dir: Path) -> list[dict]:
    """The per-epoch metrics (wall-clock `epoch_seconds` included) in the newest intact
    checkpoint a trial wrote (the furthest: a trial's checkpoints only grow), [] if none is
    intact. Workers write checkpoints straight to storage, so unlike Tune's buffered
    result.json they survive a SIGKILLed driver; one being written, or damaged, is passed over."""
    from echo.train import load_checkpoint
    for folder in sorted(Path(trial_dir).glob("checkpoint_*"), key=_index, reverse=True):
        try:
            return load_checkpoint(folder / "model.pt")["history"]
        except (ValueError, KeyError):          # damaged, or still being written
            continue
    return []


def trained_epochs(experiment: Path, prefix: str = "vae_") -> int:
    """Checkpoints written so far by the trials of an experiment folder (each trial's highest
    checkpoint index + 1; older folders are deleted, the index keeps counting)."""
    return sum(1 + max((_index(c) for c in t.glob("checkpoint_*")), default=-1)
               for t in Path(experiment).glob(f"{prefix}*") if t.is_dir())
