"""Shared setup for the report tests: hand-made result tables (a small one, and one shaped like the demo's sweep),
and checks of a written page."""

from __future__ import annotations

import csv
import json
import math
import random
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from pipeline.params import Params, params_from_dict
from pipeline.sweep.results import TRIAL_COLUMNS
from pipeline.sweep.space import config_label, trial_key

BASELINE_COLUMNS = ["method", "dataset", "shots", "seed", "val_acc", "test_acc"]
DOMAIN_SHIFT_COLUMNS = ["method", "config", "n_ctx", "ctx_init", "csc", "class_token_position", "source", "target",
                        "shots", "seed", "test_acc", "trial_key"]

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


class _TableParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag in ("br", "small") and self._cell is not None:
            self._cell.append(" | ")  # a cell's second line stays apart from its first

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def tables(html: str) -> list[list[list[str]]]:
    """Every table's rows (the header row first) as the text of their cells; a cell's lines joined by ' | '."""
    parser = _TableParser()
    parser.feed(html)
    return parser.tables


def sections(html: str) -> dict[str, str]:
    """Each <h2 id=...> section's HTML, in page order."""
    out: dict[str, str] = {}
    for part in html.split('<h2 id="')[1:]:
        name, _, body = part.partition('"')
        out[name] = body.split("</body>")[0]
    return out


# ------------------------------------------------------------------------------------------ result tables


def trial_row(dataset: str, shots: int, seed: int, val: float, test: float, **hyper: Any) -> dict[str, Any]:
    """A FINISHED few-shot trials.csv row of CoOp's paper variant (M=16, end, unified) unless `hyper` says
    otherwise (`protocol`, `method` and the methods' keys too)."""
    config = {"dataset": dataset, "protocol": "fewshot", "shots": shots, "seed": seed, "method": "coop", "n_ctx": 16,
              "ctx_init": "", "csc": False, "class_token_position": "end", "lr": 0.002, "epochs": 10,
              "batch_size": None, "precision": "fp32", "kg_weight": None, "meta_reduction": None, **hyper}
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


DEMO_DATASETS = ["WorldSketch", "WorldPastel", "WorldPastelRare"]
DEMO_SHIFTED = ["WorldSketchV2", "WorldSketchBackgrounds", "WorldSketchPastel", "WorldSketchLarge"]
DEMO_CONFIGS = [{"n_ctx": 16, "ctx_init": "", "csc": False}, {"n_ctx": 16, "ctx_init": "", "csc": True},
                {"n_ctx": 4, "ctx_init": "a photo of a", "csc": False}]


def build_demo_report_workspace(root: Path) -> dict[str, Any]:
    """Result tables shaped like the demo's (params.yaml): 3 datasets x shots 1-16 x seeds 1-3 x its 3
    configurations (M=16 unified and CSC, M=4 from 'a photo of a'), zero-shot, ensemble and lpclip linear-probe
    baselines, WorldSketch's contexts on its 4 shifted sets, every trial's nearest words, and the grid sweep's
    record under sweep.storage. Accuracies are drawn from a seeded generator with CoOp's trends (more shots help,
    CSC gains most at 16 shots). Returns root, params and the trial rows."""
    rng = random.Random(0)
    shots = [1, 2, 4, 8, 16]
    rows = []
    for dataset in DEMO_DATASETS:
        for k in shots:
            for seed in (1, 2, 3):
                for i, config in enumerate(DEMO_CONFIGS):
                    gain = 4 * math.log2(k) * (1.6 if config["csc"] else 1.0) - (8 if config["csc"] and k < 4 else 0)
                    test = 40 + gain + i + rng.gauss(0, 2)
                    row = trial_row(dataset, k, seed, val=round(test + rng.gauss(0, 3), 2), test=round(test, 2),
                                    epochs=50 if k == 1 else 100 if k <= 4 else 200, **config)
                    rows.append({**row, "trial_id": f"{dataset[:6]}{k}{seed}{i}"})
    write_csv(root / "out" / "sweep" / "trials.csv", TRIAL_COLUMNS, rows)
    words = ["drawing", "outline", "sketch", "pastel", "faded", "shape", "of", "a", "photo", "the", "colour", "print",
             "picture", "art", "line", "soft"]
    for r in rows:
        folder = root / "out" / "sweep" / "contexts" / r["trial_key"]
        folder.mkdir(parents=True)
        classes = ["circle", "square"] if r["csc"] else [None]
        vectors = [{"class": c, "label": j, "position": p + 1,
                    "words": [{"word": words[(p + j + n) % len(words)], "distance": 0.3 + 0.01 * n} for n in range(3)]}
                   for j, c in enumerate(classes) for p in range(r["n_ctx"])]
        (folder / "nearest_words.json").write_text(json.dumps({"k": 3, "vectors": vectors}))
    baselines = []
    for dataset in DEMO_DATASETS:
        baselines += [{"method": m, "dataset": dataset, "shots": 0, "seed": 0, "val_acc": "", "test_acc": acc}
                      for m, acc in (("zero-shot", 35.0), ("zero-shot-ensemble", 36.5))]
        baselines += [{"method": "linear-probe", "protocol": "lpclip", "dataset": dataset, "shots": k, "seed": seed,
                       "val_acc": 50, "test_acc": round(25 + 7 * math.log2(k) + rng.gauss(0, 2), 2)}
                      for k in shots for seed in (1, 2, 3)]
    write_csv(root / "out" / "baselines" / "baselines.csv", [*BASELINE_COLUMNS, "protocol"], baselines)
    shifted = [{"method": m, "source": "WorldSketch", "target": t, "shots": 0, "seed": 0, "test_acc": 30.0}
               for m in ("zero-shot", "zero-shot-ensemble") for t in ["WorldSketch", *DEMO_SHIFTED]]
    shifted += [{"method": "CoOp", **{k: r[k] for k in ("config", "n_ctx", "ctx_init", "csc", "class_token_position",
                                                         "seed", "trial_key")},
                 "source": "WorldSketch", "target": t, "shots": 16, "test_acc": round(r["test_acc"] - 5 * j, 2)}
                for r in rows if r["dataset"] == "WorldSketch" and r["shots"] == 16
                for j, t in enumerate(["WorldSketch", *DEMO_SHIFTED])]
    write_csv(root / "out" / "baselines" / "domain_shift.csv", DOMAIN_SHIFT_COLUMNS, shifted)
    params = params_from_dict({
        **params_for(root, [*DEMO_DATASETS, *DEMO_SHIFTED]).to_dict(),
        "backbone": {"arch": "coop-tiny-rn", "pretrained": "models/coop-tiny-world.safetensors"},
        "domain_shift": {"source": "WorldSketch", "targets": DEMO_SHIFTED},
    })
    params = params_from_dict({**params.to_dict(), "data": {**params.to_dict()["data"], "shots": shots,
                                                            "seeds": [1, 2, 3]}})
    storage = Path(params.sweep.storage)
    storage.mkdir(parents=True)
    (storage / "latest.json").write_text(json.dumps({"name": "grid-demo"}))
    (storage / "grid-demo.sweep.json").write_text(json.dumps({"name": "grid-demo", "search": "grid"}))
    return {"root": root, "params": params, "rows": rows}


# trials.csv as the sweep writes it since methods and protocols are sweep dimensions (the sweep's contract with the
# report), and as it was before them: the report reads both.
TRIAL_COLUMNS_V2 = ["trial_id", "trial_key", "state", "dataset", "protocol", "shots", "seed", "method", "n_ctx",
                    "ctx_init", "csc", "class_token_position", "lr", "epochs", "batch_size", "precision", "kg_weight",
                    "meta_reduction", "config", "last_epoch", "val_acc", "test_acc", "new_acc", "h_acc",
                    "train_seconds", "node_ip", "mlflow_run_id", "reason"]
TRIAL_COLUMNS_V1 = ["trial_id", "trial_key", "state", "dataset", "shots", "seed", "n_ctx", "ctx_init", "csc",
                    "class_token_position", "lr", "epochs", "precision", "config", "last_epoch", "val_acc", "test_acc",
                    "train_seconds", "node_ip", "mlflow_run_id", "reason"]
TRANSFER_COLUMNS = ["trial_key", "dataset", "shots", "seed", "method", "config", "target", "test_acc"]
PROTOCOL_DATASETS = ["Caltech101", "DTD"]  # both in the published base-to-new table
# Two configurations per method: the first wins on val, the second would win on test (the report must not pick it).
PROTOCOL_CONFIGS = {"coop": [{"lr": 0.002}, {"lr": 0.02}],
                    "cocoop": [{"meta_reduction": 16, "ctx_init": "a photo of a", "n_ctx": 4, "batch_size": 1},
                               {"meta_reduction": 8, "ctx_init": "a photo of a", "n_ctx": 4, "batch_size": 1}]}


def protocol_label(config: dict[str, Any]) -> str:
    """trials.csv's `config` as the contract writes it: CoOp's label unchanged, other methods prefixed."""
    init = f"init='{config['ctx_init']}'" if config["ctx_init"] else f"n_ctx={config['n_ctx']}"
    parts = [init, "csc" if config["csc"] else "unified", config["class_token_position"], f"lr={config['lr']:g}",
             f"ep={config['epochs']}"]
    if config["method"] == "cocoop":
        parts.insert(0, f"cocoop(r={config['meta_reduction']})")
    if config["batch_size"] is not None:
        parts.append(f"bs={config['batch_size']}")
    return " ".join([*parts, config["precision"]])


def build_protocols_workspace(root: Path) -> dict[str, Any]:
    """trials.csv with base-to-new and cross-dataset rows of CoOp and CoCoOp (two configurations each) on Caltech101
    and DTD, seeds 1 and 2, plus a few-shot CoOp row per dataset x seed, and the transfer.csv of the xd trials
    (each source on the other dataset). Accuracies from a seeded generator, with the val winner worse on test.
    Returns root, params, the trial rows and the transfer rows."""
    rng = random.Random(14)
    rows, transfer = [], []
    for dataset in PROTOCOL_DATASETS:
        for seed in (1, 2):
            few = trial_row(dataset, 16, seed, val=70.0 + seed, test=60.0 + seed)
            rows.append({**few, "config": protocol_label(few)})
            for method, configs in PROTOCOL_CONFIGS.items():
                for i, hyper in enumerate(configs):
                    for protocol in ("base2new", "xd"):
                        val = round(80 - 10 * i + rng.uniform(-2, 2), 2)
                        test = round(70 + 10 * i + rng.uniform(-3, 3), 2)
                        row = trial_row(dataset, 16, seed, val=val, test=test, protocol=protocol, method=method,
                                        **hyper)
                        name = f"{dataset}-{seed}-{method}-{i}-{protocol}"
                        row = {**row, "config": protocol_label(row), "trial_id": name, "trial_key": name}
                        if protocol == "base2new":
                            new = round(50 + 5 * i + rng.uniform(-4, 4), 2)
                            row.update(new_acc=new, h_acc=round(2 * test * new / (test + new), 4))
                        else:
                            target = next(d for d in PROTOCOL_DATASETS if d != dataset)
                            transfer.append({**{k: row[k] for k in TRANSFER_COLUMNS if k in row}, "target": target,
                                             "test_acc": round(40 + 5 * i + rng.uniform(-5, 5), 2)})
                        rows.append(row)
    write_csv(root / "out" / "sweep" / "trials.csv", TRIAL_COLUMNS_V2, rows)
    write_csv(root / "out" / "sweep" / "transfer.csv", TRANSFER_COLUMNS, transfer)
    return {"root": root, "params": params_for(root, PROTOCOL_DATASETS), "rows": rows, "transfer": transfer}
