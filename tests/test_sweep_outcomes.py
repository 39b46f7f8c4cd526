"""How a sweep ends when its trials do not complete: a sweep in which no trial completed
(every trial diverges, for real: beta = 1e39 overflows float32 at the first step) fails in one
line, writes no results, and closes its MLflow runs and those a killed driver of earlier params
left open. docs/reliability.md lists what each proves."""
from __future__ import annotations

import subprocess

import pytest

from support import SWEEP, child_env
from support.params import write_sweep_params
from support.processes import error_lines
from support.tracking import sweep_runs


@pytest.mark.slow
def test_sweep_without_a_completed_trial_fails_and_closes_old_runs(tmp_path):
    """Every trial diverges (beta = 1e39 overflows float32 at the first step): the stage exits
    1 with one line, writes no results/sweep.csv (DVC records nothing) and ends its MLflow
    runs as FAILED. The folder and runs of an earlier sweep with other params, left open by
    a killed driver, are archived and closed (KILLED), not left RUNNING."""
    from pipeline.sweep.experiment import experiment_uid
    from pipeline.sweep.runs import SweepRuns

    write_sweep_params(tmp_path, "nothing", betas=[1e39], epochs=1)
    # What a SIGKILLed driver of other params leaves: its folder, its parent and a child run
    # both RUNNING (made with the real tracker against the real store).
    experiment = tmp_path / "ray_results" / "nothing"
    old_uid, _ = experiment_uid(str(experiment), {"an": "older sweep"})
    old = SweepRuns(f"sqlite:///{tmp_path / 'mlflow.db'}", "nothing", "nothing", old_uid,
                       artifact_root=tmp_path / "mlartifacts").open()
    old_child = old.child_run({"trial_id": "vae_b1_mlp_z4", "method": "vae",
                               "dataset": "digits", "beta": 1.0})

    done = subprocess.run(SWEEP, cwd=tmp_path, env=child_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 1, done.stderr[-3000:]
    lines = error_lines(done.stderr)
    assert len(lines) == 1, lines
    assert "no trial completed (1 nonfinite" in lines[0] and "non-finite" in lines[0], lines[0]
    assert not (tmp_path / "results" / "sweep.csv").exists()
    assert (tmp_path / "ray_results" / f"nothing@{old_uid[:8]}").is_dir()    # archived

    client, parents, children = sweep_runs(tmp_path / "mlflow.db", "nothing")
    status = {r.info.run_id: r.info.status for r in parents + children}
    assert status[old.parent_id] == "KILLED" and status[old_child] == "KILLED"
    assert client.get_run(old_child).data.tags["status"] == "interrupted"
    new_parent = [p for p in parents if p.info.run_id != old.parent_id]
    new_child = [c for c in children if c.info.run_id != old_child]
    assert len(new_parent) == 1 and status[new_parent[0].info.run_id] == "FAILED"
    assert len(new_child) == 1 and status[new_child[0].info.run_id] == "FAILED"
    assert new_child[0].data.tags["status"] == "nonfinite"

