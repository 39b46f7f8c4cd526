"""MLflow shows the sweep's result (pipeline.results.tracking): the final test metrics in each
trial's child run, the evaluate/frontier files on the sweep's parent run, nothing twice on a
rerun, and a store that cannot be reached is one warning line, not a failed stage.

The end-to-end test runs a tiny real pipeline (prepare -> sweep on a real local Ray -> evaluate
-> frontier), serves its store with a real `mlflow ui` on 127.0.0.1 and reads it in a real
headless Chromium (Debian's, driven by Playwright)."""
from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pandas as pd
import pytest
import yaml

from support.params import DROP, tiny_params, write_params
from support.processes import dead_port
from support.system_tools import chromium
from support.tracking import mlflow_server

pytest.importorskip("mlflow")

from mlflow.entities import Metric  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from pipeline.config import Params  # noqa: E402
from pipeline.results.tracking import (EVALUATE_ARTIFACTS, FRONTIER_ARTIFACTS,  # noqa: E402
                                       publish)
from pipeline.records import NOTE_TAG, PARENT_TAG  # noqa: E402

TRIALS = ("echo_b1_mlp_z4", "vae_b1_mlp_z4")


def histories(client: MlflowClient, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Every metric of a run with all its (step, value) entries."""
    return {name: sorted((m.step, m.value) for m in client.get_metric_history(run_id, name))
            for name in client.get_run(run_id).data.metrics}


def artifacts(client: MlflowClient, run_id: str) -> list[str]:
    return sorted(a.path for a in client.list_artifacts(run_id))


def store_state(client: MlflowClient, run_ids) -> dict:
    return {r: (histories(client, r), artifacts(client, r), client.get_run(r).data.tags)
            for r in run_ids}


# ---- fast: the logging itself, against runs made as the sweep makes them --------------------


def fake_sweep(root: Path) -> tuple[MlflowClient, str, dict[str, str]]:
    """A store with a parent and two child runs tagged as pipeline.sweep.tracking tags them (with a
    per-epoch test_neg_elbo history), and the files the stages would have written."""
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.create_experiment("t", artifact_location=(root / "art").as_uri())
    parent = client.create_run(experiment, run_name="tiny",
                               tags={"echo.role": "sweep"}).info.run_id
    children = {}
    for trial in TRIALS:
        run = client.create_run(experiment, run_name=trial,
                                tags={PARENT_TAG: parent, "trial_id": trial}).info.run_id
        client.log_batch(run, metrics=[Metric("test_neg_elbo", 40.0 - e, 0, e) for e in (1, 2)])
        client.set_terminated(run)
        children[trial] = run
    (root / "results").mkdir()
    pd.DataFrame({"trial_id": TRIALS, "status": "completed",
                  "mlflow_run_id": [children[t] for t in TRIALS]}).to_csv(
        root / "results/sweep.csv", index=False)
    pd.DataFrame({"trial_id": TRIALS, "status": "completed", "rate": [6.25, 4.5],
                  "rate_kind": ["exact", "analytic_kl"], "distortion": [28.0, 29.75],
                  "neg_elbo": [34.25, 34.25], "iwae_k": [math.nan, 8],
                  "iwae_neg_log_lik": [math.nan, 32.5]}).to_csv(
        root / "results/evaluation.csv", index=False)
    for name in EVALUATE_ARTIFACTS[1:] + FRONTIER_ARTIFACTS:
        (root / name).write_text(f"content of {name}\n")
    (root / "metrics.json").write_text(json.dumps(HEADLINE))
    (root / "results/table.md").write_text(TABLE_MD)
    return client, parent, children


HEADLINE = {"neg_elbo.echo": 34.25, "neg_elbo.vae": 34.25, "distortion_gap.echo_vs_vae": -1.5,
            "rate_gap.echo_vs_vae": 0.25}
IN_WORDS_LINES = ("- At β = 1 the lowest test −ELBO is echo's.", "- **echo vs vae**: -1.50 nats")
TABLE_MD = "\n".join(["# Results", "", "## In words", "", *IN_WORDS_LINES, "",
                      "## Best −ELBO per method", "", "| method |", ""])


def test_results_are_logged_once_and_a_lost_store_is_one_warning(tmp_path, monkeypatch, capsys):
    client, parent, children = fake_sweep(tmp_path)
    capsys.readouterr()                       # MLflow's own log of creating the store
    monkeypatch.chdir(tmp_path)               # the stages run in the project root
    params = Params.model_validate({"tracking": {"uri": "sqlite:///mlflow.db"}})
    for _ in range(2):                        # the second time is a rerun of both stages
        assert publish("evaluate", params) and publish("frontier", params)
    assert "warning" not in capsys.readouterr().err
    echo, vae = (children[t] for t in TRIALS)
    assert histories(client, vae) == {
        "test_neg_elbo": [(1, 39.0), (2, 38.0)],           # the sweep's epochs, untouched
        "final_test_rate": [(0, 4.5)], "final_test_distortion": [(0, 29.75)],
        "final_test_neg_elbo": [(0, 34.25)], "final_test_iwae_neg_log_lik": [(0, 32.5)]}
    # How the numbers were obtained are settings: params (rate_kind also a tag).
    assert client.get_run(vae).data.params == {"rate_kind": "analytic_kl", "iwae_k": "8"}
    # Echo has no IWAE bound: no such metric (nor k) rather than a NaN
    assert set(histories(client, echo)) == {"test_neg_elbo", "final_test_rate",
                                           "final_test_distortion", "final_test_neg_elbo"}
    assert client.get_run(echo).data.params == {"rate_kind": "exact"}
    assert client.get_run(echo).data.tags["rate_kind"] == "exact"
    # The parent: metrics.json's numbers as metrics, once; table.md's "In words" and the
    # R-D figure (served by the same server) as its description.
    assert histories(client, parent) == {k: [(0, v)] for k, v in HEADLINE.items()}
    note = client.get_run(parent).data.tags[NOTE_TAG]
    assert all(line in note for line in IN_WORDS_LINES) and "Best −ELBO" not in note
    assert f"(get-artifact?path=rd_curves.png&run_uuid={parent})" in note
    assert artifacts(client, parent) == sorted(Path(f).name for f in
                                               EVALUATE_ARTIFACTS + FRONTIER_ARTIFACTS)
    assert all(artifacts(client, c) == [] for c in children.values())

    # A changed result (other evaluate params) is appended as the newest, the rest kept; a
    # param never changes: the newest k is a tag of the same name.
    evaluation = pd.read_csv("results/evaluation.csv")
    evaluation.loc[1, ["neg_elbo", "iwae_k"]] = [33.0, 16]
    evaluation.to_csv("results/evaluation.csv", index=False)
    before = store_state(client, [echo, parent])
    assert publish("evaluate", params)
    assert histories(client, vae)["final_test_neg_elbo"] == [(0, 34.25), (1, 33.0)]
    assert client.get_run(vae).data.metrics["final_test_neg_elbo"] == 33.0
    assert client.get_run(vae).data.params["iwae_k"] == "8"
    assert client.get_run(vae).data.tags["iwae_k"] == "16"
    assert store_state(client, [echo, parent]) == before

    # Unreachable stores: one warning line each, nothing raised, no empty store created.
    missing_db = tmp_path / "elsewhere" / "mlflow.db"
    with dead_port() as port:                  # held: nothing listens there meanwhile
        for uri in (f"http://127.0.0.1:{port}", f"sqlite:///{missing_db}"):
            lost = Params.model_validate({"tracking": {"uri": uri}})
            assert not publish("frontier", lost)
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and err.startswith(f"warning: MLflow ({uri})"), err
            assert "python -m pipeline.results.tracking" in err
    assert not missing_db.exists()


def test_the_saved_view_charts_only_metrics_every_method_has():
    """MLflow drops from a parallel-coordinates chart every run without one of its metrics;
    Echo logs no IWAE metric (no density), so the saved view's charts never use it, and its
    parallel-coordinates chart has only params and metrics that Echo's runs have too."""
    from pipeline.results.tracking import FINAL_METRICS, chart_view_state
    charts = chart_view_state("uid")["compareRunCharts"]
    assert "iwae" not in json.dumps(charts)
    [parallel] = [c for c in charts if c["type"] == "PARALLEL"]
    echo_metrics = {metric for column, metric in FINAL_METRICS if column != "iwae_neg_log_lik"}
    assert set(parallel["selectedMetrics"]) <= echo_metrics and parallel["showAllRuns"]
    assert set(parallel["selectedParams"]) <= {"method", "beta"}
    assert len(parallel["selectedParams"]) + len(parallel["selectedMetrics"]) >= 2   # drawn


# ---- slow: a real tiny pipeline, a real `mlflow ui`, a real browser --------------------------


UI_TRIALS = {"echo_b1_mlp_z4": "echo", "vae_b1_mlp_z4": "vae", "infovae_b1_mlp_z4": "infovae"}


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory) -> tuple[Path, str]:
    """prepare -> sweep -> evaluate -> frontier, in-process in a tmp project (a git checkout):
    echo, vae and infovae at beta 1, one seed, one epoch on 150 images. Returns the project and
    what the frontier stage printed."""
    from stages.evaluate import main as evaluate_main
    from stages.frontier import main as frontier_main
    from stages.prepare import main as prepare_main
    from stages.sweep import main as sweep_main

    root = tmp_path_factory.mktemp("ui")
    write_params(root, tiny_params(
        "ui", train={"epochs": 1},
        sweep={"methods": ["echo", "vae", "infovae"], "betas": [1.0], "seeds": [0],
               "train_limit": 150, "test_limit": 60, "max_concurrent": 1},  # one Ray worker
        evaluate={"iwae_k": 8, "batch_size": DROP, "test_limit": 60}))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        assert prepare_main([]) == 0
        assert sweep_main(["--verbose", "0"]) == 0
        assert evaluate_main([]) == 0
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            assert frontier_main([]) == 0
    return root, printed.getvalue()


@pytest.mark.slow
@pytest.mark.xdist_group("ui_pipeline")           # the tiny pipeline run, once
def test_every_run_records_its_settings_its_commit_and_its_colour(pipeline_run):
    from echo import clip_factor
    from echo.methods import method_options
    from pipeline.colors import method_color
    from pipeline.records import COLOR_TAG, COMMIT_TAG
    from pipeline.mlflow_store import git_commit
    from pipeline.records import PROVENANCE_SETTINGS as TRIAL_SETTINGS

    root, _ = pipeline_run
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    sweep = pd.read_csv(root / "results/sweep.csv").set_index("trial_id")
    commit = git_commit()
    for trial, method in UI_TRIALS.items():
        run = client.get_run(sweep.loc[trial, "mlflow_run_id"])
        params, tags = run.data.params, run.data.tags
        # every training setting and the method's own options, nothing of another method's
        assert set(params) == {*TRIAL_SETTINGS, *method_options(method), "rate_kind",
                               *(["iwae_k"] if method != "echo" else [])}, method
        assert params["epochs"] == "1" and params["beta_warmup_steps"] and params["lr_decay_start"]
        assert ("clip_factor" in params) == (method == "echo") and params.get("iwae_k") in (None, "8")
        if method == "echo":           # the value its rule chose for the batch, not "none"
            assert float(params["clip_factor"]) == clip_factor(int(params["batch_size"]) - 1)
        assert tags[COLOR_TAG] == method_color(method)
        assert tags.get(COMMIT_TAG) == commit            # None only outside a git checkout
        assert set(run.data.metrics) >= {"final_test_rate", "final_test_distortion"}
        assert "iwae_k" not in run.data.metrics
    parent = client.get_run(run.data.tags[PARENT_TAG])
    assert all(k.startswith("sweep.") for k in parent.data.params), parent.data.params
    assert parent.data.params["sweep.methods"] == "echo,vae,infovae"


def _printed_link(printed: str, url: str) -> str:
    """The link the frontier stage printed, pointed at this test's `mlflow ui`."""
    line = next(line for line in printed.splitlines() if "then open http" in line)
    link = line.split("then open ", 1)[1].strip()
    assert link.startswith("http://127.0.0.1:5000/#/experiments/"), link
    return link.replace("http://127.0.0.1:5000", url)


@pytest.mark.slow
@pytest.mark.xdist_group("ui_pipeline")           # the tiny pipeline run, once
def test_from_the_printed_link_the_ui_compares_every_trial_and_shows_the_answer(pipeline_run):
    """The user's path in a real browser: the link the frontier stage prints opens the sweep's
    runs in chart mode with the rate-distortion scatter; one click (unfolding the sweep's run)
    shows an Echo, a VAE and an InfoVAE run there, each point in its method's colour; the
    parent run shows the headline metrics, its description (In words) and the R-D figure."""
    from pipeline.colors import method_color

    browser_path = chromium()
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    root, printed = pipeline_run
    sweep = pd.read_csv(root / "results/sweep.csv").set_index("trial_id")
    assert sorted(sweep.index) == sorted(UI_TRIALS)
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    child = client.get_run(sweep.loc["vae_b1_mlp_z4", "mlflow_run_id"])
    parent_id = child.data.tags[PARENT_TAG]
    experiment = child.info.experiment_id
    parent = client.get_run(parent_id)
    metrics = json.loads((root / "metrics.json").read_text())
    assert {f"neg_elbo.{m}" for m in UI_TRIALS.values()} <= set(metrics)
    assert set(metrics) <= set(parent.data.metrics)
    in_words = (root / "results/table.md").read_text().split("## In words")[1].split("##")[0]
    first_line = next(line for line in in_words.splitlines() if line.startswith("- At β"))
    wait = 120_000                            # ms; the UI's bundle is large on a busy machine

    with mlflow_server(root / "mlflow.db", command="ui") as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=browser_path, headless=True,
                                     args=["--no-sandbox"])       # root in CI containers
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(_printed_link(printed, url), timeout=wait)
            # The saved view: the scatter's section, and the sweep's run to unfold (click 1).
            page.get_by_text("Rate-distortion (test set)").first.wait_for(timeout=wait)
            parent_link = page.get_by_role("link", name="ui", exact=True).first
            parent_link.wait_for(timeout=wait)
            page.locator("[role=row]", has=parent_link).locator(
                "button[data-component-id*='runnamecellrenderer']").click()
            for trial in UI_TRIALS:
                page.get_by_role("link", name=trial, exact=True).wait_for(timeout=wait)
            # The scatter (Plotly): one point per trial, in its method's colour.
            points = page.locator(".scatterlayer path.point")
            page.wait_for_function(
                "n => document.querySelectorAll('.scatterlayer path.point').length >= n",
                arg=len(UI_TRIALS), timeout=wait)
            fills = points.evaluate_all("ps => ps.map(p => getComputedStyle(p).fill)")
            expected = {_rgb(method_color(m)) for m in UI_TRIALS.values()}
            assert len(fills) == len(UI_TRIALS) and set(fills) == expected, fills
            # The parallel-coordinates chart (Plotly parcoords) keeps Echo: its method axis
            # lists every method (a run without one of its metrics would be left out).
            page.wait_for_function(
                "n => document.querySelectorAll('.parcoords .axis .tick text').length >= n",
                arg=len(UI_TRIALS), timeout=wait)
            ticks = set(page.locator(".parcoords .axis .tick text").evaluate_all(
                "ts => ts.map(t => t.textContent)"))           # SVG text: no innerText
            assert set(UI_TRIALS.values()) <= ticks, ticks

            # The parent run: its metrics, its description and the figure in it.
            page.goto(f"{url}/#/experiments/{experiment}/runs/{parent_id}", timeout=wait)
            row = page.locator("[role=row]", has_text="neg_elbo.echo").first
            row.wait_for(timeout=wait)
            assert row.inner_text().split()[0] == "neg_elbo.echo"
            page.get_by_text(first_line[2:40]).first.wait_for(timeout=wait)
            figure = page.locator("img[src*='rd_curves.png']").first
            figure.wait_for(timeout=wait)
            page.wait_for_function("img => img.complete && img.naturalWidth > 100",
                                   arg=figure.element_handle(), timeout=wait)
        finally:
            browser.close()


def _rgb(color: str) -> str:
    """"#1f77b4" as the browser's computed style writes it: "rgb(31, 119, 180)"."""
    r, g, b = (int(color[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgb({r}, {g}, {b})"


@pytest.mark.slow
@pytest.mark.xdist_group("ui_pipeline")           # the tiny pipeline run, once
def test_rerun_stages_add_nothing_and_an_unreachable_store_is_a_warning(pipeline_run,
                                                                       monkeypatch):
    from stages.evaluate import main as evaluate_main
    from stages.frontier import main as frontier_main

    root, _ = pipeline_run
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("ui").experiment_id])
    before = store_state(client, [r.info.run_id for r in runs])
    monkeypatch.chdir(root)
    assert evaluate_main([]) == 0 and frontier_main([]) == 0       # dvc repro -f evaluate
    assert store_state(client, before) == before

    # The files are the results: a tracking server that is down leaves the stage at exit 0.
    params = yaml.safe_load(Path("params.yaml").read_text())
    with dead_port() as port:                  # held: nothing listens there meanwhile
        params["tracking"]["uri"] = f"http://127.0.0.1:{port}"
        Path("lost.yaml").write_text(yaml.safe_dump(params))
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            assert frontier_main(["--params", "lost.yaml"]) == 0
    lines = err.getvalue().splitlines()
    assert [line for line in lines if "MLflow" in line or line.startswith("warning")] == [
        line for line in lines if line.startswith(f"warning: MLflow ({params['tracking']['uri']})")]
    assert len(lines) == 1, lines
    assert (root / "results/rd_curves.png").stat().st_size > 0
