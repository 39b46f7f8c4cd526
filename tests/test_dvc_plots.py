"""DVC's interactive plots (dvc.yaml `plots:`, templates in .dvc/plots/): what `dvc plots show`
and `dvc plots diff` draw, checked in a real DVC repository and rendered by the shipped Vega
scripts in a real headless Chromium with the network cut off.

- DVC hands CSV values to Vega as strings: the frontier is still drawn in numeric order of rate
  ("8.52" < "18.0" < "45.9", not as text), on numeric axes;
- `dvc plots diff` draws each revision's curves apart (one line per method and revision);
- each method is drawn in its colour of results/rd_curves.png and MLflow (pipeline.colors);
- the page renders offline (.dvc/config's html_template inlines vega, vega-lite, vega-embed)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipeline.colors import METHOD_COLORS, method_color
from support import REPO
from support.system_tools import chromium

FRONTIER = "R-D frontier per method"
TRIALS = "Every evaluated trial"
# Rates whose text order is not their numeric order, per method, distortion falling with rate.
# A method without a fixed colour ("my-method") gets pipeline.colors' spare one.
RATES = {"echo": [8.52, 18.0, 45.9], "vae": [4.5, 10.25, 100.5], "my-method": [3.0, 7.5, 30.0]}
PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                    "1f15c4890000000d49444154789c6360000002000001e221bc330000000049454e44ae426082")


def _run(args: list[str], cwd: Path) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "test",
           "GIT_AUTHOR_EMAIL": "test@localhost", "GIT_COMMITTER_NAME": "test",
           "GIT_COMMITTER_EMAIL": "test@localhost"}
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"{' '.join(args)}:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
    return out.stdout


def _write_results(root: Path, shift: float) -> None:
    rows, trials = [], []
    for method, rates in RATES.items():
        for i, rate in enumerate(rates):
            distortion = 40.0 - 5 * i + shift
            rows.append({"series": method, "method": method, "beta": 1.0 / (i + 1),
                         "rate": rate, "distortion": distortion, "rate_kind": "exact"})
            trials.append({"trial_id": f"{method}_{i}", "method": method, "status": "completed",
                           "rate": rate, "distortion": distortion})
    trials.append({"trial_id": "vae_nan", "method": "vae", "status": "nonfinite",
                   "rate": float("nan"), "distortion": float("nan")})
    (root / "results").mkdir(exist_ok=True)
    pd.DataFrame(rows).to_csv(root / "results/frontier.csv", index=False)
    pd.DataFrame(trials).to_csv(root / "results/evaluation.csv", index=False)
    for name in ("rd_curves.png", "reconstructions.png"):
        (root / "results" / name).write_bytes(PNG)


@pytest.fixture(scope="module")
def plots_repo(tmp_path_factory) -> Path:
    """A git + DVC repository with the project's dvc.yaml, params.yaml and .dvc/ (config and
    templates), and results committed at HEAD and changed in the workspace."""
    if shutil.which("git") is None:
        pytest.skip("git not found")
    root = tmp_path_factory.mktemp("plots")
    for name in ("dvc.yaml", "params.yaml", ".dvc/config", ".dvc/.gitignore"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / ".dvc/plots", root / ".dvc/plots")
    _write_results(root, shift=0.0)
    _run(["git", "init", "-q"], root)
    _run(["git", "add", "-A", "-f"], root)            # results/ is git-ignored in the project
    _run(["git", "commit", "-qm", "first"], root)
    _write_results(root, shift=-2.0)                 # the workspace: a better run
    return root


def _specs(root: Path, *args: str) -> dict[str, dict]:
    """plot id -> the Vega-Lite spec DVC fills (data included), as `--json` prints it."""
    data = json.loads(_run(["dvc", "plots", *args, "--json"], root))["data"]
    return {name: entries[0]["content"] for name, entries in data.items()
            if entries and entries[0]["type"] == "vega"}


@pytest.mark.xdist_group("dvc_plots_repo")        # the module's repository, made once
def test_dvc_fills_the_templates_with_text_that_the_specs_turn_into_numbers(plots_repo):
    spec = _specs(plots_repo, "show")[FRONTIER]
    values = spec["data"]["values"]
    assert {type(v["rate"]) for v in values} == {str}      # what DVC hands to Vega
    assert {"calculate": "toNumber(datum['rate'])", "as": "rate"} in spec["transform"]
    assert {"calculate": "toNumber(datum['distortion'])", "as": "distortion"} in spec["transform"]
    assert spec["encoding"]["strokeDash"]["field"] == "rev"
    config = (REPO / ".dvc/config").read_text()
    assert "html_template = plots/offline.html" in config


WALK = """async (spec) => {
    const el = document.createElement('div');
    document.body.appendChild(el);
    const result = await vegaEmbed(el, spec, {renderer: 'svg', actions: false});
    const lines = [], points = [];
    (function walk(node) {
        if (node.marktype === 'line')
            lines.push(node.items.map(i => ({x: i.x, rate: i.datum.rate, rev: i.datum.rev,
                                              series: i.datum.series, stroke: i.stroke})));
        if (node.marktype === 'symbol' && node.role === 'mark')     // not the legend's
            points.push(...node.items.map(i => ({rate: i.datum.rate, x: i.x, fill: i.fill,
                                                  method: i.datum.method})));
        (node.items || []).forEach(walk);
    })(result.view.scenegraph().root);
    return {lines, points, height: el.getBoundingClientRect().height};
}"""


@pytest.mark.slow
@pytest.mark.xdist_group("dvc_plots_repo")
def test_plots_render_offline_in_numeric_order_and_diff_separates_revisions(plots_repo):
    browser_path = chromium()
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    out = plots_repo / "dvc_plots_diff"
    _run(["dvc", "plots", "diff", "HEAD", "-o", str(out)], plots_repo)
    html = (out / "index.html").read_text()
    assert "cdn.jsdelivr" not in html and "vegaEmbed" in html
    diff = _specs(plots_repo, "diff", "HEAD")
    show = _specs(plots_repo, "show")

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=browser_path, headless=True,
                                     args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            requests = []

            def offline(route):
                requests.append(route.request.url)
                if route.request.url.startswith(("file:", "data:")):
                    route.continue_()
                else:
                    route.abort()
            page.route("**/*", offline)
            errors = []
            page.on("pageerror", lambda err: errors.append(str(err)))
            page.goto((out / "index.html").as_uri())
            # Both interactive plots drawn (vega-embed's svg/canvas, with a height).
            page.wait_for_function("document.querySelectorAll('.vega-embed').length >= 2",
                                   timeout=60_000)
            heights = page.eval_on_selector_all(
                ".vega-embed .marks",   # the chart (not the actions icon)
                "els => els.map(e => e.getBoundingClientRect().height)")
            assert len(heights) >= 2 and min(heights) > 100, heights
            assert errors == [], errors
            assert [u for u in requests if not u.startswith(("file:", "data:"))] == []

            # What the plots draw: the scene graph of each spec, rendered by the same scripts.
            drawn = page.evaluate(WALK, show[FRONTIER])
            assert len(drawn["lines"]) == len(RATES)              # one line per method
            for line in drawn["lines"]:
                rates = [p["rate"] for p in line]
                assert all(isinstance(r, (int, float)) for r in rates), rates
                assert rates == sorted(rates) == RATES[line[0]["series"]], rates
                xs = [p["x"] for p in line]
                assert xs == sorted(xs), xs                       # drawn left to right
                # in the method's colour of rd_curves.png and MLflow
                assert {p["stroke"] for p in line} == {method_color(line[0]["series"])}
            drawn = page.evaluate(WALK, diff[FRONTIER])
            lines = {(line[0]["rev"], line[0]["series"]) for line in drawn["lines"]}
            assert lines == {(rev, m) for rev in ("HEAD", "workspace") for m in RATES}
            assert all(len(line) == 3 and len({p["rev"] for p in line}) == 1
                       for line in drawn["lines"])
            trials = page.evaluate(WALK, show[TRIALS])
            # the nonfinite trial is left out, the others are placed by their numeric rate
            assert len(trials["points"]) == sum(map(len, RATES.values()))
            placed = sorted(trials["points"], key=lambda p: p["x"])
            assert [p["rate"] for p in placed] == sorted(r for rs in RATES.values() for r in rs)
            assert all(p["fill"] == method_color(p["method"]) for p in placed), placed
        finally:
            browser.close()


def test_plots_in_dvc_yaml_use_the_shipped_templates():
    plots = yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]
    templates = [list(p.values())[0]["template"] for p in plots if isinstance(p, dict)]
    assert templates and all((REPO / t).is_file() for t in templates)


@pytest.mark.parametrize("template", ["rd_frontier.json", "rd_points.json"])
def test_the_templates_colour_each_method_as_pipeline_colors_does(template):
    """The colour scale's range is each method's colour (a calculated field, so that the legend
    lists only the methods drawn): the mapping in the template is METHOD_COLORS, its fallback
    the colour method_color gives any other method; the toNumber transforms stay first."""
    spec = json.loads((REPO / ".dvc/plots" / template).read_text())
    transforms = spec["transform"]
    assert [t.get("calculate", "")[:9] for t in transforms[:2]] == ["toNumber("] * 2
    [colour] = [t for t in transforms if t.get("as") == "method_color"]
    mapping, fallback = colour["calculate"].split("[datum.method] || ")
    mapping = json.loads(mapping.replace("'", '"'))
    assert mapping == METHOD_COLORS
    assert fallback.strip("'") == method_color("a-method-added-later") == method_color("x")
    encoding = spec["encoding"]["color"]
    assert encoding["field"] == "method" and encoding["scale"] == {"range": {"field": "method_color"}}
