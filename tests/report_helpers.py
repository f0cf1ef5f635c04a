"""Shared setup for the report tests: hand-made result tables, and checks of a written page."""

from __future__ import annotations

import csv
import math
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from pipeline.params import Params, params_from_dict
from pipeline.sweep.results import TRIAL_COLUMNS
from pipeline.sweep.space import config_label, trial_key

BASELINE_COLUMNS = ["method", "dataset", "shots", "seed", "val_acc", "test_acc"]

# ------------------------------------------------------------------------------------------- page checks


class _PageParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict[str, str | None]] = []
        self.links: list[str] = []
        self.tables: list[int] = []  # body rows per table
        self._in_body = False

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
    for part in html.split('<h2 id="')[1:]:
        name, _, body = part.partition('"')
        out[name] = body.split("</body>")[0]
    return out


# ------------------------------------------------------------------------------------------ result tables


def trial_row(dataset: str, shots: int, seed: int, val: float, test: float, **hyper: Any) -> dict[str, Any]:
    """A FINISHED trials.csv row of the paper's variant (M=16, end, unified) unless `hyper` says otherwise."""
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


def params_for(tmp_path: Path, datasets: list[str] | None = None) -> Params:
    """RN50/openai (the published numbers' backbone), results under tmp_path/out, MLflow in tmp_path."""
    return params_from_dict({
        "data": {"datasets": datasets or ["Caltech101"], "shots": [1, 16], "seeds": [1, 2]},
        "backbone": {"arch": "RN50", "pretrained": "openai"},
        "sweep": {"results_dir": str(tmp_path / "out" / "sweep"), "storage": str(tmp_path / "ray")},
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "report-test"},
        "report": {"dir": str(tmp_path / "out" / "report"), "baselines_dir": str(tmp_path / "out" / "baselines")},
    })


def build_report_workspace(root: Path) -> dict[str, Any]:
    """Caltech101 at 1 and 16 shots, two seeds: the paper variant twice (two learning rates) and a CSC one,
    a failed trial, zero-shot and linear-probe baselines. Returns root, params and the trial rows."""
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
    write_csv(root / "out" / "sweep" / "trials.csv", TRIAL_COLUMNS, rows)
    baselines = [{"method": "zero-shot", "dataset": "Caltech101", "shots": 0, "seed": 0, "val_acc": "",
                  "test_acc": 86.0}]
    baselines += [{"method": "linear-probe", "dataset": "Caltech101", "shots": s, "seed": e, "val_acc": 50,
                   "test_acc": 60.0 + s + e} for s in (1, 16) for e in (1, 2)]
    write_csv(root / "out" / "baselines" / "baselines.csv", BASELINE_COLUMNS, baselines)
    return {"root": root, "params": params_for(root), "rows": rows}
