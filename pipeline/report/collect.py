"""The report's inputs: trials.csv, transfer.csv, baselines.csv, domain_shift.csv, the published numbers, the best
contexts' words."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.data.protocols import FEWSHOT
from pipeline.data.published import load_published
from pipeline.params import Params
from pipeline.report.labels import DEFAULT_METHOD, DEFAULT_PROTOCOL
from pipeline.report.statistics import (
    AccuracyPoint,
    baseline_points,
    best_config_points,
    best_context_trials,
    coop_points,
    number_or_nan,
    protocol_trials,
)
from pipeline.tables import read_csv_rows

# What the sweep leaves under sweep.storage (pipeline/sweep/resume.py): latest.json names the sweep started
# last, <name>.sweep.json records its search. Read as plain JSON: the report needs only the search's name.
LATEST_SWEEP_FILE = "latest.json"
SWEEP_STATE_SUFFIX = ".sweep.json"


TRANSFER_FILE = "transfer.csv"  # the sweep's cross-dataset results: a row per (xd trial, target)


def optional_number(value: str | None, kind: type[int] | type[float]) -> int | float | None:
    """An optional CSV cell (batch_size, kg_weight, meta_reduction) as `kind`; None when empty."""
    return kind(value) if value not in (None, "") else None


def typed_trial(row: dict[str, str], search: str = "") -> dict[str, Any]:
    """A trials.csv row with numbers and booleans parsed; `search` (grid, random, optuna) unless the row has one.
    Rows written before methods and protocols were sweep dimensions are CoOp's, few-shot."""
    return {**row, "shots": int(row["shots"]), "seed": int(row["seed"]), "n_ctx": int(row["n_ctx"]),
            "csc": row["csc"] == "True", "lr": number_or_nan(row["lr"]), "epochs": int(row["epochs"]),
            "val_acc": number_or_nan(row["val_acc"]), "test_acc": number_or_nan(row["test_acc"]),
            "protocol": row.get("protocol") or DEFAULT_PROTOCOL, "method": row.get("method") or DEFAULT_METHOD,
            "batch_size": optional_number(row.get("batch_size"), int),
            "kg_weight": optional_number(row.get("kg_weight"), float),
            "meta_reduction": optional_number(row.get("meta_reduction"), int),
            "new_acc": number_or_nan(row.get("new_acc")), "h_acc": number_or_nan(row.get("h_acc")),
            "search": row.get("search") or search}


@dataclass
class ReportData:
    """Everything the page shows, as read from the stages' tables."""

    params: Params
    results_dir: Path
    baselines_dir: Path
    trial_rows: list[dict[str, str]]  # every trials.csv row, any state
    finished_trials: list[dict[str, Any]]  # the FINISHED rows, typed (every protocol)
    baseline_rows: list[dict[str, str]]
    domain_shift_rows: list[dict[str, str]]
    published: dict[str, Any]
    search: str = ""  # the search that produced trials.csv
    search_source: str = ""  # where `search` was read
    domain_shift_gap: str = ""  # why there are no domain-shift results, when there are none
    # dataset -> its interpreted contexts: {"role", "trial", "k", "vectors"} (the best, then the best unified)
    context_words: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # warnings shown at the top of the page
    transfer_rows: list[dict[str, str]] = field(default_factory=list)  # transfer.csv: xd trials on other datasets

    @property
    def fewshot_trials(self) -> list[dict[str, Any]]:
        """The finished few-shot trials: what the per-dataset tables and the shots figure show."""
        return protocol_trials(self.finished_trials, FEWSHOT)

    @property
    def coop_points(self) -> list[AccuracyPoint]:
        return coop_points(self.fewshot_trials)

    @property
    def best_points(self) -> list[AccuracyPoint]:
        return best_config_points(self.fewshot_trials)

    @property
    def baseline_points(self) -> list[AccuracyPoint]:
        return baseline_points(self.baseline_rows)


def sweep_search(params: Params) -> tuple[str, str]:
    """The search of the sweep started last under sweep.storage (the one that wrote trials.csv unless
    results_dir was overridden), and where that was read; sweep.search from the params without a record."""
    storage = Path(params.sweep.storage)
    try:
        name = json.loads((storage / LATEST_SWEEP_FILE).read_text(encoding="utf-8"))["name"]
        state = storage / f"{name}{SWEEP_STATE_SUFFIX}"
        return str(json.loads(state.read_text(encoding="utf-8"))["search"]), f"recorded in {state}"
    except (OSError, ValueError, KeyError, TypeError):
        return params.sweep.search, "sweep.search in the params (no sweep record under sweep.storage)"


def domain_shift_gap(params: Params, trial_rows: list[dict[str, str]], csv_path: Path) -> str:
    """Why domain_shift.csv holds no result, precisely: not computed yet, or what the params or the sweep lack
    (the stage writes an empty table when the pipeline has no domain-shift experiment to run)."""
    if not csv_path.is_file():
        return f"{csv_path} does not exist: run the domain-shift stage (dvc repro domain_shift)."
    shift = params.domain_shift
    listed = {d.lower() for d in params.data.datasets}
    targets = [t for t in shift.targets if t.lower() != shift.source.lower()]
    if shift.source.lower() not in listed:
        return (f"the source domain_shift.source = {shift.source} is not in data.datasets "
                f"({', '.join(params.data.datasets)}): add it there (with its trials) or set domain_shift.source "
                "to one of them.")
    if not any(t.lower() in listed for t in targets):
        return (f"none of the shifted test sets in domain_shift.targets ({', '.join(targets) or 'none'}) is in "
                f"data.datasets ({', '.join(params.data.datasets)}): list the prepared ones there.")
    if not any(r.get("state") == "FINISHED" and r.get("dataset", "").lower() == shift.source.lower()
               for r in trial_rows):
        return (f"the sweep has no finished {shift.source} trial (domain_shift.source): its space must include "
                f"{shift.source}.")
    return (f"{csv_path} is empty although data.datasets and the sweep have what it needs: it predates them; "
            "rerun dvc repro domain_shift.")


def collect(params: Params, tracking_uri: str | None = None) -> ReportData:
    """Read every input the report draws on (sweep.results_dir, report.baselines_dir, the published numbers);
    missing optional inputs leave their sections empty."""
    results_dir = Path(params.sweep.results_dir)
    baselines_dir = Path(params.report.baselines_dir)
    notes = []
    trial_rows: list[dict[str, str]] = []
    trials_path = results_dir / "trials.csv"
    if trials_path.is_file():
        trial_rows = read_csv_rows(trials_path)
    else:
        notes.append(f"{trials_path} does not exist: run the sweep (dvc repro sweep).")
    search, search_source = sweep_search(params)
    finished = [typed_trial(r, search) for r in trial_rows if r.get("state") == "FINISHED"]
    if any(r.get("dataset") == "ImageNet" for r in trial_rows):
        # CoOp's ImageNet has no val split: its few-shot "val" comes from the test images (val_is_test).
        notes.append("ImageNet has no validation split: as in the official code its few-shot val images come from "
                     "the test set, so the best ImageNet configuration is selected on test images.")
    baselines_path, domain_shift_path = baselines_dir / "baselines.csv", baselines_dir / "domain_shift.csv"
    baseline_rows = read_csv_rows(baselines_path) if baselines_path.is_file() else []
    domain_shift_rows = read_csv_rows(domain_shift_path) if domain_shift_path.is_file() else []
    gap = "" if domain_shift_rows else domain_shift_gap(params, trial_rows, domain_shift_path)
    transfer_path = results_dir / TRANSFER_FILE
    transfer_rows = read_csv_rows(transfer_path) if transfer_path.is_file() else []
    data = ReportData(params, results_dir, baselines_dir, trial_rows, finished, baseline_rows, domain_shift_rows,
                      load_published(), search, search_source, gap, notes=notes, transfer_rows=transfer_rows)
    data.context_words = best_context_words(data, tracking_uri)
    return data


def best_context_words(data: ReportData, tracking_uri: str | None) -> dict[str, list[dict[str, Any]]]:
    """Per dataset, the nearest words of the contexts statistics.best_context_trials picks (the best by val,
    and the best unified one when that is CSC), from the sweep's contexts folder or the trial's MLflow run;
    contexts whose artifacts are unavailable are left out."""
    from pipeline.tracking import resolve_tracking_uri, trial_artifacts

    uri = resolve_tracking_uri(tracking_uri, data.params.tracking.uri)
    out: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="coop-report-") as tmp:
        # The few-shot trials' contexts, as the papers interpret them; a sweep without any: the other protocols'.
        for dataset, choice in best_context_trials(data.fewshot_trials or data.finished_trials).items():
            for role, trial in (("best", choice.best), ("best unified", choice.best_unified)):
                if trial is None:
                    continue
                folder = trial_artifacts(trial, data.results_dir, Path(tmp), uri, names=("nearest_words.json",))
                if folder is None:
                    continue
                words = json.loads((folder / "nearest_words.json").read_text(encoding="utf-8"))
                out.setdefault(dataset, []).append({"role": role, "trial": trial, "k": words.get("k"),
                                                    "vectors": words["vectors"]})
    return out
