"""One driver per sweep: a second driver of the same sweep refuses in one line naming the
running one (pipeline.sweep.experiment.experiment_lock), for real: two real drivers started at
once. docs/reliability.md lists what each test proves. Every process a test starts is stopped
by PID, also on failure."""
from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from echo.train import load_checkpoint
from pipeline.sweep.errors import SweepLocked
from pipeline.sweep.experiment import experiment_lock
from support import SWEEP, child_env, stop
from support.params import write_sweep_params
from support.processes import error_lines
from support.tracking import metric_steps, sweep_runs

HOLDER = textwrap.dedent("""
    import json, os, socket, sys, time
    from filelock import FileLock
    lock = FileLock(sys.argv[1])
    lock.acquire()
    print("locked", flush=True)
    time.sleep(float(sys.argv[3]))           # a driver slow to write its owner file (a loaded machine)
    with open(sys.argv[2] + ".tmp", "w") as fh:
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": "now",
                   "command": "python -m stages.sweep --params params.yaml"}, fh)
    os.replace(sys.argv[2] + ".tmp", sys.argv[2])
    time.sleep(120)
""")


def test_a_driver_refused_before_the_holder_wrote_its_name_still_names_it(tmp_path):
    """The holder writes its owner file just after it took the lock; a second driver refused in
    between waits for the file (seconds) instead of naming no one, and never names a dead
    driver's stale file."""
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    owner = tmp_path / ".s.owner.json"
    owner.write_text(json.dumps({"pid": int(gone.stdout), "host": socket.gethostname(),
                                 "started": "earlier", "command": "a driver that was killed"}))
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / ".s.lock"),
                               str(owner), "1.5"], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SweepLocked) as info:
            with experiment_lock(str(tmp_path), "s"):
                pass
    finally:
        stop(holder)
    message = str(info.value)
    assert f"pid {holder.pid} on {socket.gethostname()}" in message, message
    assert "stages.sweep" in message and "killed" not in message and "\n" not in message


@contextlib.contextmanager
def drivers(root: Path, count: int):
    """`count` sweep drivers started at once, each in its own session, stderr to
    root/driver<i>.err (a file, read when the test fails); on exit every process of their trees
    (their local Ray included) is killed by PID."""
    procs = []
    try:
        for i in range(count):
            with open(root / f"driver{i}.err", "w") as err:
                procs.append(subprocess.Popen(SWEEP, cwd=root, env=child_env(),
                                              start_new_session=True, stdout=subprocess.DEVNULL,
                                              stderr=err))
        yield procs
    finally:
        for proc in procs:
            stop(proc)


@pytest.mark.slow
def test_second_driver_refuses_naming_the_running_one(tmp_path, monkeypatch, capsys):
    """Two `python -m stages.sweep` at the same moment, no mlflow.db yet: one trains, the
    other refuses in one line naming the first one's pid (no alembic race, no duplicate
    runs or epochs). Then evaluate's hint for a damaged checkpoint is followed and works."""
    from stages.evaluate import main as evaluate_main
    from stages.prepare import main as prepare_main

    # Retries: the winner's trials may crash once on a loaded machine (both drivers then ended 1
    # in 2 of 6 loaded runs); a retried trial resumes from its checkpoint, and every epoch must
    # still be logged once (asserted below).
    write_sweep_params(tmp_path, "dup", max_failures=2, max_concurrent=1)     # one Ray worker
    monkeypatch.chdir(tmp_path)
    assert prepare_main(["--params", "params.yaml"]) == 0
    with drivers(tmp_path, 2) as procs:
        for proc in procs:
            proc.wait(timeout=900)
    errs = [(tmp_path / f"driver{i}.err").read_text() for i in range(len(procs))]
    codes = [proc.returncode for proc in procs]
    assert sorted(codes) == [0, 1], "\n".join(
        f"driver {i} ({proc.pid}) exited {proc.returncode}:\n{err[-3000:]}"
        for i, (proc, err) in enumerate(zip(procs, errs)))
    winner, loser = (procs[0], procs[1]) if codes[0] == 0 else (procs[1], procs[0])
    lines = error_lines(errs[procs.index(loser)])
    assert len(lines) == 1, lines
    assert "already running" in lines[0] and f"pid {winner.pid} " in lines[0], lines[0]
    assert "stages.sweep" in lines[0]                      # names the running command

    trials = {"vae_b0.5_mlp_z4", "vae_b1_mlp_z4"}
    client, parents, children = sweep_runs(tmp_path / "mlflow.db", "dup")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(c.data.tags["trial_id"] for c in children) == sorted(trials)
    for child in children:
        steps = metric_steps(client, child.info.run_id)
        assert steps == [1, 2], steps                         # every epoch logged once
    table = pd.read_csv(tmp_path / "results/sweep.csv").set_index("trial_id")
    assert set(table.index) == trials and set(table["status"]) == {"completed"}

    # Case 9: a damaged checkpoint. The hint names what restores it; deleting does not.
    target = tmp_path / table.loc["vae_b1_mlp_z4", "checkpoint"]
    good = load_checkpoint(target)["history"]
    target.write_bytes(target.read_bytes()[:100])
    assert evaluate_main(["--params", "params.yaml"]) == 1
    err = error_lines(capsys.readouterr().err)           # (beside evaluate's progress bar)
    assert len(err) == 1 and str(target.relative_to(tmp_path)) in err[0], err
    assert "dvc repro -f sweep" in err[0] and "delete it" not in err[0], err[0]
    # What `dvc repro -f sweep` runs: the finished experiment is resumed, nothing retrains,
    # the checkpoints are rewritten from it, and MLflow gains no run or epoch.
    again = subprocess.run(SWEEP, cwd=tmp_path, env=child_env(), capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert load_checkpoint(target)["history"] == good
    client, parents, children = sweep_runs(tmp_path / "mlflow.db", "dup")
    assert len(parents) == 1 and len(children) == 2
    for child in children:
        steps = metric_steps(client, child.info.run_id)
        assert steps == [1, 2], steps

