"""The MLflow tracking store as the sweep meets it: a real `mlflow server` that goes away
mid-sweep (SIGKILLed; restarted, or left dead), credentials or non-URIs in tracking.uri, a
damaged (truncated) or read-only (a real read-only bind mount) SQLite store. docs/reliability.md
lists what each proves. Every process a test starts is stopped by PID, and every mount is
undone, also on failure."""
from __future__ import annotations

import subprocess
import time

import pytest

from support import SWEEP, child_env, snapshot, stop
from support.files import trained_epochs
from support.mounts import read_only
from support.params import write_sweep_params
from support.processes import error_lines, wait_for
from support.tracking import metric_rows, metric_steps, start_mlflow, sweep_runs


@pytest.mark.slow
def test_tracking_server_outage_is_bridged_or_ends_in_one_line(tmp_path):
    """A real `mlflow server` is SIGKILLed mid-sweep. Restarted a little later: the trials
    trained on meanwhile, the driver wrote what it had buffered, the sweep ends 0 with every
    epoch logged once. Left dead (with the wait bounded at 10 s): the stage stops, exit 1, in
    one line that names the store and says a rerun resumes, instead of blocking ~4 minutes a
    call and ending in tracebacks."""
    db, log = tmp_path / "server.db", tmp_path / "server.log"
    server, port = start_mlflow(db, log)                   # on a free port
    uri = f"http://127.0.0.1:{port}"
    write_sweep_params(tmp_path, "outage", betas=[0.5, 1.0], epochs=6, max_concurrent=1, uri=uri)
    driver = None
    try:
        with open(tmp_path / "driver.err", "w") as err:
            driver = subprocess.Popen(SWEEP, cwd=tmp_path, env=child_env(),
                                      start_new_session=True, stdout=subprocess.DEVNULL,
                                      stderr=err)
            wait_for(lambda: metric_rows(db, "outage") > 0, 600, "a first metric", driver)
            stop(server)                                         # the fault
            done = trained_epochs(tmp_path / "ray_results" / "outage")
            wait_for(lambda: trained_epochs(tmp_path / "ray_results" / "outage") >= done + 2,
                     300, "training while the store is away", driver)
            server, _ = start_mlflow(db, log, port=port)       # it comes back, where it was
            assert driver.wait(timeout=600) == 0, (tmp_path / "driver.err").read_text()[-3000:]
        stderr = (tmp_path / "driver.err").read_text()
        assert "Traceback" not in stderr and "unreachable" in stderr and "is back" in stderr
        client, parents, children = sweep_runs(uri, "outage")
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        assert len(children) == 2
        for child in children:
            assert child.info.status == "FINISHED"
            steps = metric_steps(client, child.info.run_id)
            assert steps == list(range(1, 7)), steps             # every epoch, once

        # Left dead: a bounded wait, then one line.
        write_sweep_params(tmp_path, "outage2", betas=[1.0], epochs=6, uri=uri)
        before = metric_rows(db, "outage2")
        driver = subprocess.Popen(SWEEP, cwd=tmp_path,
                                  env={**child_env(), "ECHO_TRACKING_MAX_OUTAGE_S": "10"},
                                  start_new_session=True, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True)
        wait_for(lambda: metric_rows(db, "outage2") > before, 600, "a first metric", driver)
        stop(server)
        killed = time.monotonic()
        _, stderr = driver.communicate(timeout=400)
        assert driver.returncode == 1, stderr[-3000:]
        assert time.monotonic() - killed < 10 + 180              # bounded, not ~4 min a call
        lines = error_lines(stderr)
        assert len(lines) == 1, lines
        assert uri in lines[0] and "unreachable" in lines[0] and "run the stage again" in lines[0]
    finally:
        if driver is not None:
            stop(driver)
        stop(server)



PASSWORD = "Pa55w0rd-never-logged"


def stage_mains():
    from stages.evaluate import main as evaluate_main
    from stages.frontier import main as frontier_main
    from stages.prepare import main as prepare_main
    from stages.sweep import main as sweep_main
    return {"prepare": prepare_main, "sweep": sweep_main, "evaluate": evaluate_main,
            "frontier": frontier_main}


@pytest.mark.parametrize("uri, expected", [
    (f"http://alice:{PASSWORD}@127.0.0.1:5000", "MLFLOW_TRACKING_PASSWORD"),
    (f"https://{PASSWORD}@mlflow.example.org", "MLFLOW_TRACKING_USERNAME"),
    (f"postgresql://bob:{PASSWORD}@db.example.org/mlflow", "PGPASSWORD"),
    ("localhost:5000", "http://localhost:5000"),
    ("mlflow.db", "sqlite:///mlflow.db"),
])
def test_credentials_or_non_uris_in_tracking_uri_stop_every_stage(tmp_path, monkeypatch, capsys,
                                                                  uri, expected):
    """A password in tracking.uri (it would reach dvc.lock, logs and Tune's pickled state), or
    a tracking.uri that is not a URI (`localhost:5000`, a bare `mlflow.db`: MLflow reads them
    as something else and failed with a traceback after Ray started): every stage exits 2 with
    one line naming tracking.uri and the fix, never showing the password; nothing written."""
    write_sweep_params(tmp_path, "creds", uri=uri)
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    for stage, main in stage_mains().items():
        assert main(["--params", "params.yaml"]) == 2, stage
        out, err = capsys.readouterr()
        lines = err.strip().splitlines()
        assert len(lines) == 1, (stage, lines)
        assert "tracking.uri" in lines[0] and expected in lines[0], (stage, lines[0])
        assert PASSWORD not in out + err, (stage, out, err)
        assert snapshot(tmp_path) == before, stage


def test_damaged_or_read_only_store_is_refused_before_anything_is_archived(tmp_path,
                                                                           monkeypatch, capsys):
    """An earlier sweep of other params (its experiment folder; its runs in a real mlflow.db);
    then mlflow.db truncated to half, or made read-only: the sweep exits 1 in one line naming
    the file and the fix, before Ray starts, and the earlier experiment is not archived."""
    import ray
    from pipeline.sweep.experiment import experiment_uid, stored_uid
    from pipeline.sweep.runs import SweepRuns
    from stages.sweep import main as sweep_main

    write_sweep_params(tmp_path, "store")
    experiment = tmp_path / "ray_results" / "store"
    old_uid, _ = experiment_uid(str(experiment), {"an": "older sweep"})
    db = tmp_path / "mlflow.db"
    old = SweepRuns(f"sqlite:///{db}", "store", "store", old_uid,
                       artifact_root=tmp_path / "mlartifacts").open()
    old.child_run({"trial_id": "vae_b1_mlp_z4", "method": "vae", "dataset": "digits",
                   "beta": 1.0})
    good = db.read_bytes()
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()                                  # MLflow's notes on creating the store

    def refused(*words: str) -> None:
        assert sweep_main(["--params", "params.yaml"]) == 1
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and str(db) in lines[0], lines
        assert all(word in lines[0] for word in words), lines[0]
        assert stored_uid(str(experiment)) == old_uid                  # not archived
        assert not list((tmp_path / "ray_results").glob("store@*"))
        assert not ray.is_initialized()

    db.write_bytes(good[: len(good) // 2])
    refused("damaged", "restore it from a backup")
    db.write_bytes(good)
    with read_only(db):
        refused("cannot be written", "make it writable")

