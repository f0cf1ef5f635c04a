"""DVC's views of a sweep: a self-contained plots page with one line per configuration, metrics as a table."""

from __future__ import annotations

import asyncio
import configparser
import itertools
import json
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from pipeline.engine.train import default_epochs
from pipeline.sweep.results import TrialRecord, line_labels, summarize, write_results
from pipeline.sweep.space import config_label
from pipeline.tables import read_csv_rows

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ("WorldSketch", "WorldPastel")
SHOTS = (1, 2, 4, 16)  # CoOp's schedule: 50, 100, 100 and 200 epochs
SEEDS = (1, 2)
VARIANTS = [  # (n_ctx, ctx_init, csc): the demo's three configurations
    (16, "", False), (16, "", True), (4, "a photo of a", False),
]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _config(dataset: str, shots: int, seed: int, n_ctx: int, ctx_init: str, csc: bool, epochs: int | None = None):
    return {"dataset": dataset, "shots": shots, "seed": seed, "n_ctx": n_ctx, "ctx_init": ctx_init, "csc": csc,
            "class_token_position": "end", "lr": 0.002,
            "epochs": epochs or default_epochs(dataset, shots), "precision": "fp32"}


def _records() -> list[TrialRecord]:
    """Every dataset x shots x seed x variant finished with made-up accuracies, plus one failed trial."""
    rng = random.Random(0)
    records = [TrialRecord(_config(d, k, s, *v), state="FINISHED", val_acc=rng.uniform(20, 80),
                           test_acc=rng.uniform(20, 80))
               for d in DATASETS for k in SHOTS for s in SEEDS for v in VARIANTS]
    records.append(TrialRecord(_config(DATASETS[0], 1, 3, *VARIANTS[0]), state="FAILED"))
    return records


def _best_by_val(records: list[TrialRecord]) -> dict[tuple[str, int], tuple[str, float, float]]:
    """Reference: (dataset, shots) -> label, mean test and mean val accuracy of the highest mean val accuracy
    (every configuration here has the same seeds)."""
    groups: dict[tuple[str, int, str], list[TrialRecord]] = {}
    for r in records:
        if r.state == "FINISHED":
            groups.setdefault((r.config["dataset"], r.config["shots"], config_label(r.config)), []).append(r)
    best: dict[tuple[str, int], tuple[str, float, float]] = {}
    for (dataset, shots, label), members in groups.items():
        val = sum(m.val_acc for m in members) / len(members)
        test = sum(m.test_acc for m in members) / len(members)
        if (dataset, shots) not in best or val > best[(dataset, shots)][2]:
            best[(dataset, shots)] = (label, test, val)
    return best


def test_plot_rows_form_one_line_per_dataset_and_configuration_across_shots(tmp_path):
    records = _records()
    write_results(tmp_path, records)
    rows = read_csv_rows(tmp_path / "plots.csv")

    expected = {f"{d} | {config_label(_config(d, 1, 1, *v), epochs=False)}" for d in DATASETS for v in VARIANTS}
    assert {r["series"] for r in rows} == expected
    for series in expected:  # each line has a point at every shots value despite the per-shot epochs
        assert sorted(int(r["shots"]) for r in rows if r["series"] == series) == sorted(SHOTS)
    # One row per dataset x shots x configuration (the best is a flag, not a repeated point), with the full
    # configuration, epochs included, for the tooltip.
    keys = [(r["dataset"], r["shots"], r["config"]) for r in rows]
    assert len(keys) == len(set(keys)) == len(DATASETS) * len(SHOTS) * len(VARIANTS)
    assert all(f"ep={default_epochs(r['dataset'], int(r['shots']))}" in r["config"] for r in rows)
    best = _best_by_val(records)
    flagged = {(r["dataset"], int(r["shots"])): r["config"] for r in rows if r["best_by_val"] == "yes"}
    assert flagged == {setting: label for setting, (label, _, _) in best.items()}


def test_lines_keep_the_epochs_when_they_are_a_choice():
    records = [TrialRecord(_config("D", k, 1, 16, "", False, epochs), state="FINISHED", val_acc=50.0, test_acc=50.0)
               for k in (1, 2) for epochs in (10, 20)]
    lines = line_labels(summarize(records))
    assert sorted(set(lines.values())) == ["n_ctx=16 unified end lr=0.002 ep=10 fp32",
                                           "n_ctx=16 unified end lr=0.002 ep=20 fp32"]


def test_metrics_are_one_small_file_per_dataset_and_shots(tmp_path):
    records = _records()
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "Gone-1shot.json").write_text("{}")  # a setting of an earlier sweep
    write_results(tmp_path, records)
    best = _best_by_val(records)
    files = {f.name: json.loads(f.read_text()) for f in (tmp_path / "metrics").iterdir()}
    assert sorted(files) == sorted(f"{d}-{k:02d}shot.json" for d in DATASETS for k in SHOTS)
    for (dataset, shots), (_, test, val) in best.items():
        entry = files[f"{dataset}-{shots:02d}shot.json"]
        assert entry["test_acc"] == pytest.approx(test, abs=1e-4) and entry["val_acc"] == pytest.approx(val, abs=1e-4)
        assert entry["n_seeds"] == len(SEEDS) and entry["finished"] == len(SEEDS) * len(VARIANTS)
        assert entry["failed"] == (1 if (dataset, shots) == (DATASETS[0], 1) else 0)


# --- through DVC itself ------------------------------------------------------------------------------------


def _dvc(project: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, f"dvc {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A DVC project with the repository's .dvc/config, .dvc/plots and the sweep stage's metrics and plots
    definitions from dvc.yaml, over result files written by the sweep's own code."""
    project = tmp_path_factory.mktemp("dvcplots")
    _dvc(project, "init", "--no-scm", "-q")
    plots_config = configparser.ConfigParser()
    plots_config.read(ROOT / ".dvc" / "config")
    for key, value in plots_config["plots"].items():
        _dvc(project, "config", f"plots.{key}", value)
    shutil.copytree(ROOT / ".dvc" / "plots", project / ".dvc" / "plots")
    sweep = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["sweep"]
    stage = {"cmd": "true", "metrics": sweep["metrics"], "plots": sweep["plots"]}
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"sweep": stage}}))
    (project / "params.yaml").write_text(yaml.safe_dump({"sweep": {"results_dir": "res"}}))
    write_results(project / "res", _records())
    return project


class _Elements(HTMLParser):
    """Every start tag with its attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))


def _elements(html: str) -> list[tuple[str, dict[str, str]]]:
    parser = _Elements()
    parser.feed(html)
    return parser.tags


@pytest.fixture(scope="module")
def page(project: Path) -> Path:
    _dvc(project, "plots", "show")
    return project / "dvc_plots" / "index.html"


@pytest.mark.slow
def test_plots_page_is_self_contained(page):
    html = page.read_text()
    tags = _elements(html)
    remote = [(tag, attrs) for tag, attrs in tags for name in ("src", "href")
              if attrs.get(name, "").startswith(("http:", "https:", "//"))]
    assert remote == []  # DVC's default page loads Vega from cdn.jsdelivr.net: blank offline
    scripts = [attrs for tag, attrs in tags if tag == "script"]
    assert len(scripts) >= 4 and not any("src" in attrs for attrs in scripts)  # vega, vega-lite, vega-embed, plot
    assert "vegaEmbed(" in html and "{plot_divs}" not in html


@dataclass
class Browsed:
    """What a headless Chromium showed of the plots page."""

    lines: list[str]  # aria-label of each drawn line
    points: list[str]  # aria-label of each drawn point
    tooltip: str  # the tooltip shown while the pointer rests on a best-by-val point


async def _browse(url: str, profile: Path) -> Browsed:
    """Load `url` in headless Chromium with every network fetch failing, driven over the DevTools protocol."""
    import aiohttp  # mlflow's dependency

    # Host names resolve nowhere and the proxy is a closed port: the page must need no network.
    process = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
         "--window-size=1400,900", "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9",
         "--remote-debugging-port=0", "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            assert time.monotonic() < deadline, "Chromium did not open its DevTools port"
            await asyncio.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        ids = itertools.count(1)
        async with aiohttp.ClientSession() as session:
            targets = await (await session.get(f"http://127.0.0.1:{port}/json/list")).json()
            tab = next(t for t in targets if t["type"] == "page")
            async with session.ws_connect(tab["webSocketDebuggerUrl"], max_msg_size=0) as socket:

                async def call(method: str, **params: object) -> dict:
                    n = next(ids)
                    await socket.send_json({"id": n, "method": method, "params": params})
                    while (answer := await socket.receive_json()).get("id") != n:
                        pass  # an event
                    assert "error" not in answer, answer
                    return answer["result"]

                async def evaluate(expression: str) -> object:
                    return (await call("Runtime.evaluate", expression=expression, returnByValue=True))["result"].get(
                        "value")

                async def wait_for(expression: str) -> object:
                    deadline = time.monotonic() + 30
                    while not (value := await evaluate(expression)):
                        assert time.monotonic() < deadline, f"never true in the page: {expression}"
                        await asyncio.sleep(0.2)
                    return value

                await call("Page.navigate", url=url)
                labels = "(kind) => [...document.querySelectorAll(`path[aria-roledescription='${kind}']`)]" \
                         ".map(e => e.getAttribute('aria-label'))"
                points = await wait_for(f"({labels})('point')")
                lines = await evaluate(f"({labels})('line mark')")
                x, y = await evaluate("""(() => {  // the centre of a best point that no other mark covers
                    const centre = (e) => { const b = e.getBoundingClientRect();
                                            return [b.x + b.width / 2, b.y + b.height / 2]; };
                    const best = [...document.querySelectorAll("path[aria-roledescription='point']")]
                        .filter(e => e.getAttribute('aria-label').includes('best by val: yes'))
                        .find(e => document.elementFromPoint(...centre(e)) === e);
                    return centre(best); })()""")
                await call("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
                tooltip = await wait_for("(document.getElementById('vg-tooltip-element') || {}).innerText")
                return Browsed(lines, points, tooltip)
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def browsed(page: Path, tmp_path_factory) -> Browsed:
    if CHROMIUM is None:
        pytest.skip("needs a headless Chromium (Debian: apt-get install chromium)")
    pytest.importorskip("aiohttp")  # the DevTools protocol's websocket (mlflow depends on it)
    return asyncio.run(_browse(page.as_uri(), tmp_path_factory.mktemp("chromium")))


@pytest.mark.slow
def test_plots_page_draws_a_line_per_configuration_in_a_browser_without_network(browsed, project):
    rows = read_csv_rows(project / "res" / "plots.csv")
    series = {r["series"] for r in rows}
    assert len(browsed.lines) == len(series)  # the SVG vega-embed drew: one line per dataset x configuration
    assert {label.split("series: ")[1].split("; ")[0] for label in browsed.lines} == series
    assert len(browsed.points) == len(rows)  # one point per row: the best-by-val ones are not drawn twice
    assert sum("best by val: yes" in p for p in browsed.points) == len(DATASETS) * len(SHOTS)
    for row in rows:
        assert any(f"configuration: {row['config']};" in p and f"shots: {row['shots']};" in p
                   and f"dataset: {row['dataset']};" in p for p in browsed.points)


@pytest.mark.slow
def test_plots_tooltip_names_the_full_configuration(browsed, project):
    best = {(r["dataset"], r["shots"]): r["config"] for r in read_csv_rows(project / "res" / "plots.csv")
            if r["best_by_val"] == "yes"}
    text = " ".join(browsed.tooltip.split())
    assert "configuration" in text and "best by val yes" in text
    assert any(f"dataset {d} configuration {config} shots {k} " in text for (d, k), config in best.items())


@pytest.mark.slow
def test_metrics_show_prints_a_row_per_dataset_and_shots(project):
    shown = json.loads(_dvc(project, "metrics", "show", "--json"))
    (revision,) = shown.values()  # the workspace (keyed "" without git)
    files = revision["data"]
    assert len(files) == len(DATASETS) * len(SHOTS)
    for (dataset, shots), (_, test, _) in _best_by_val(_records()).items():
        entry = files[f"res/metrics/{dataset}-{shots:02d}shot.json"]["data"]
        assert entry["test_acc"] == pytest.approx(test, abs=1e-4)
    table = _dvc(project, "metrics", "show").splitlines()
    assert len(table) == 1 + len(DATASETS) * len(SHOTS)  # a header, then a row per setting
    assert max(map(len, table)) < 120
