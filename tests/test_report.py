"""The report page from hand-made result tables: what it selects, what it computes, how it says "no data",
and that the page is self-contained (every image inline, no empty table)."""

from __future__ import annotations

import csv
import importlib
import json
import math
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from pipeline.params import params_from_dict
from pipeline.report import (
    collect,
    independent_keys,
    main,
    mean_std,
    param_importances,
    render,
    typed_trial,
    write_report,
)
from pipeline.sweep.results import TRIAL_COLUMNS
from pipeline.sweep.space import config_label, trial_key

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------- page checks (shared)


class _PageParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict[str, str | None]] = []
        self.links: list[str] = []
        self.tables: list[int] = []  # body rows per table
        self._in_body = False
        self.sections: dict[str, list[str]] = {}
        self._section: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "img":
            self.images.append(attributes)
        if tag in ("link", "script") and (attributes.get("href") or attributes.get("src")):
            self.links.append(str(attributes.get("href") or attributes.get("src")))
        if tag == "table":
            self.tables.append(0)
        if tag == "tbody":
            self._in_body = True
        if tag == "tr" and self._in_body:
            self.tables[-1] += 1
        if tag == "h2":
            self._section = attributes.get("id")
            self.sections[str(self._section)] = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "tbody":
            self._in_body = False


def check_html(html: str) -> list[str]:
    """Problems that make a page not self-contained or half-empty: images that are not inline data URIs,
    external scripts/styles, tables without a body row."""
    parser = _PageParser()
    parser.feed(html)
    problems = [f"image without an inline data URI: {str(img.get('src'))[:60]}" for img in parser.images
                if not str(img.get("src") or "").startswith("data:image/")]
    problems += [f"external resource {link}" for link in parser.links]
    problems += [f"table #{i} has no rows" for i, rows in enumerate(parser.tables) if rows == 0]
    return problems


def sections(html: str) -> dict[str, str]:
    """Each <h2 id=...> section's HTML, in page order."""
    out: dict[str, str] = {}
    parts = html.split('<h2 id="')[1:]
    for part in parts:
        name, _, body = part.partition('"')
        out[name] = body.split("</body>")[0]
    return out


# ------------------------------------------------------------------------------------------- fixtures


def trial_row(dataset: str, shots: int, seed: int, val: float, test: float, **hyper: Any) -> dict[str, Any]:
    config = {"dataset": dataset, "shots": shots, "seed": seed, "n_ctx": 16, "ctx_init": "", "csc": False,
              "class_token_position": "end", "lr": 0.002, "epochs": 10, "precision": "fp32", **hyper}
    return {**config, "trial_id": f"t{seed}", "trial_key": trial_key(config), "state": "FINISHED",
            "config": config_label(config), "val_acc": val, "test_acc": test, "train_seconds": 1.0,
            "node_ip": "127.0.0.1", "mlflow_run_id": "", "reason": ""}


def write_csv(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def params_for(tmp_path: Path, datasets: list[str] | None = None) -> Any:
    return params_from_dict({
        "data": {"datasets": datasets or ["Caltech101"], "shots": [1, 16], "seeds": [1, 2]},
        "backbone": {"arch": "RN50", "pretrained": "openai"},
        "sweep": {"results_dir": str(tmp_path / "out" / "sweep"), "storage": str(tmp_path / "ray")},
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "report-test"},
        "report": {"dir": str(tmp_path / "out" / "report"), "baselines_dir": str(tmp_path / "out" / "baselines")},
    })


BASELINE_COLUMNS = ["method", "dataset", "shots", "seed", "val_acc", "test_acc"]


@pytest.fixture
def workspace(tmp_path: Path) -> dict[str, Any]:
    """Caltech101 at 1 and 16 shots, two seeds: the paper variant twice (two learning rates) and a CSC one."""
    rows = []
    for shots in (1, 16):
        base = 80.0 if shots == 1 else 90.0
        for seed in (1, 2):
            # lr 0.002: better on val, worse on test; lr 0.02: the reverse. The report must pick lr 0.002.
            rows.append(trial_row("Caltech101", shots, seed, val=base + 5, test=base + seed, lr=0.002))
            rows.append(trial_row("Caltech101", shots, seed, val=base - 5, test=base + 9, lr=0.02))
            rows.append(trial_row("Caltech101", shots, seed, val=base, test=base - 2, csc=True))
    failed = trial_row("Caltech101", 16, 3, val=math.nan, test=math.nan)
    rows.append({**failed, "state": "FAILED", "val_acc": "", "test_acc": "", "reason": "boom"})
    write_csv(tmp_path / "out" / "sweep" / "trials.csv", TRIAL_COLUMNS, rows)
    baselines = [{"method": "zero-shot", "dataset": "Caltech101", "shots": 0, "seed": 0, "val_acc": "",
                  "test_acc": 86.0}]
    baselines += [{"method": "linear-probe", "dataset": "Caltech101", "shots": s, "seed": e, "val_acc": 50,
                   "test_acc": 60.0 + s + e} for s in (1, 16) for e in (1, 2)]
    write_csv(tmp_path / "out" / "baselines" / "baselines.csv", BASELINE_COLUMNS, baselines)
    return {"root": tmp_path, "params": params_for(tmp_path), "rows": rows}


# ---------------------------------------------------------------------------------------------- tests


def test_report_picks_by_validation_and_compares_with_the_paper(workspace: dict[str, Any]) -> None:
    data = collect(workspace["params"])
    series = {(s.method, s.shots): s for s in data.coop}
    paper = series[("CoOp M=16, end, unified", 16)]
    # lr=0.002 wins on val (95 vs 85) though lr=0.02 is better on test: test never selects.
    assert paper.config == config_label({**workspace["rows"][0], "shots": 16})
    assert (paper.mean, paper.n) == (91.5, 2) and paper.std == pytest.approx(0.5)
    assert series[("CoOp M=16, end, CSC", 16)].mean == 88.0

    html = render(data)
    assert check_html(html) == []
    parts = sections(html)
    published = parts["published"]
    assert "91.50 ± 0.50" in published and "91.83" in published and "-0.33" in published  # 91.5 - 91.83
    assert "86.00" in published  # our zero-shot; the paper's is ImageNet-only
    assert "not a reproduction result" not in published  # RN50/openai, like the paper
    numbers = parts["accuracy"]
    assert "62.50 ± 0.50" in numbers and "77.50 ± 0.50" in numbers  # linear probe: 60 + shots + seed
    # No ImageNet, no contexts: those sections say so in one line instead of an empty table.
    assert parts["domain"].count('class="empty"') == 1 and "<table" not in parts["domain"]
    assert parts["words"].count('class="empty"') == 1 and "<table" not in parts["words"]
    assert "1 failed" in html and "12 finished" in html


def test_sweep_section_shows_effects_and_importances(workspace: dict[str, Any]) -> None:
    data = collect(workspace["params"])
    sweep = sections(render(data))["sweep"]
    assert "<img" in sweep and "fANOVA" in sweep
    assert "learning rate" in sweep and "class-specific context (CSC)" in sweep
    importances, why = param_importances(data.trials, ["csc", "lr"])
    assert why == "" and set(importances) == {"class-specific context (CSC)", "learning rate"}
    assert sum(importances.values()) == pytest.approx(1.0)


def test_mirrored_hyperparameters_are_reported_once() -> None:
    trials = [typed_trial({k: str(v) for k, v in trial_row("D", 1, 1, 50, 50, **hyper).items()})
              for hyper in ({"n_ctx": 16, "ctx_init": "", "csc": False}, {"n_ctx": 4, "ctx_init": "a photo of a"},
                            {"n_ctx": 16, "ctx_init": "", "csc": True})]
    assert independent_keys(trials, ["n_ctx", "ctx_init", "csc"]) == {"n_ctx": ["ctx_init"], "csc": []}


def test_nearest_words_come_from_the_best_unified_context(workspace: dict[str, Any]) -> None:
    root = workspace["root"]
    rows = [r for r in workspace["rows"] if r["state"] == "FINISHED" and r["shots"] == 16]
    best = max((r for r in rows if not r["csc"]), key=lambda r: (r["val_acc"], -r["seed"]))
    for r in rows:  # the sweep's local contexts folder, one per trial
        folder = root / "out" / "sweep" / "contexts" / r["trial_key"]
        folder.mkdir(parents=True)
        word = "chosen" if r is best else "other"
        vectors = [{"class": None, "position": i + 1, "words": [{"word": f"{word}{i}", "distance": 0.5}]}
                   for i in range(16)]
        (folder / "nearest_words.json").write_text(json.dumps({"k": 1, "vectors": vectors}))
    words = sections(render(collect(workspace["params"])))["words"]
    assert "chosen0" in words and "chosen15" in words and "other" not in words
    assert f"seed {best['seed']}" in words


def test_no_results_at_all_gives_one_line_per_section(tmp_path: Path) -> None:
    path = write_report(params_for(tmp_path), mlflow=False)
    html = path.read_text()
    assert check_html(html) == []
    parts = sections(html)
    assert len(parts) == 5
    for name, body in parts.items():
        assert body.count('class="empty"') >= 1, name
    assert "does not exist" in html
    assert [p.name for p in path.parent.iterdir()] == ["index.html"]  # no temp file left behind


def test_random_weights_are_flagged_and_check_html_catches_problems(tmp_path: Path) -> None:
    params = params_from_dict({**params_for(tmp_path).to_dict(), "backbone": {"arch": "coop-tiny", "pretrained": None}})
    html = write_report(params, mlflow=False).read_text()
    assert "random weights" in html
    bad = '<img src="plot.png"><table><thead><tr><th>a</th></tr></thead><tbody></tbody></table>'
    assert len(check_html(bad)) == 2
    assert mean_std([1.0, math.nan, 3.0]) == (2.0, 1.0, 2)


def test_cli_writes_and_logs_the_page(workspace: dict[str, Any], tmp_path: Path) -> None:
    params_file = tmp_path / "params.yaml"
    import yaml

    params_file.write_text(yaml.safe_dump(workspace["params"].to_dict()))
    assert main(["--params", str(params_file)]) == 0
    page = Path(workspace["params"].report.dir) / "index.html"
    assert page.is_file() and check_html(page.read_text()) == []
    from mlflow import MlflowClient

    client = MlflowClient(workspace["params"].tracking.uri)
    experiment = client.get_experiment_by_name("report-test")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.data.tags["coop.stage"] for r in runs] == ["report"]
    assert [a.path for a in client.list_artifacts(runs[0].info.run_id)] == ["index.html"]
    assert main(["--params", str(tmp_path / "missing.yaml")]) == 2


@pytest.mark.parametrize("module", ["pipeline.report", "pipeline.baselines_run", "pipeline.domain_shift",
                                    "pipeline.import_context", "pipeline.costmodel"])
def test_every_flag_has_help(module: str) -> None:
    parser = importlib.import_module(module).build_parser()
    for action in parser._actions:
        assert action.help and action.help.strip(), f"{module}: {action.option_strings} has no help"


@pytest.mark.parametrize("module", ["stages.report", "stages.baselines"])
def test_stage_entry_points_answer_help(module: str) -> None:
    done = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "--params" in done.stdout and "DVC stage" in done.stdout


def test_domain_shift_without_imagenet_writes_an_empty_table(workspace: dict[str, Any], tmp_path: Path) -> None:
    from pipeline.domain_shift import COLUMNS, run_domain_shift

    out = tmp_path / "ds"
    assert run_domain_shift(workspace["params"], out, progress=False) == []
    with (out / "domain_shift.csv").open() as f:
        assert f.read().strip() == ",".join(COLUMNS)
    assert "No domain-shift results" in sections(render(collect(workspace["params"], baselines_dir=out)))["domain"]


def test_imagenet_selection_on_test_images_is_flagged(tmp_path: Path) -> None:
    params = params_for(tmp_path, ["ImageNet", "Caltech101"])
    plain = collect(params)
    assert not any("ImageNet has no validation split" in n for n in plain.notes)
    rows = [trial_row("ImageNet", 16, 1, val=60.0, test=61.0)]
    write_csv(tmp_path / "out" / "sweep" / "trials.csv", TRIAL_COLUMNS, rows)
    html = render(collect(params))
    assert "ImageNet has no validation split" in html
