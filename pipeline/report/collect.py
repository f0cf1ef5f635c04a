"""The report's inputs: trials.csv, baselines.csv, domain_shift.csv, the published numbers, the best contexts' words."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.data.published import load_published
from pipeline.params import Params
from pipeline.report.statistics import (
    AccuracyPoint,
    baseline_points,
    best_context_trials,
    coop_points,
    number_or_nan,
)
from pipeline.tables import read_csv_rows


def typed_trial(row: dict[str, str]) -> dict[str, Any]:
    """A trials.csv row with numbers and booleans parsed."""
    return {**row, "shots": int(row["shots"]), "seed": int(row["seed"]), "n_ctx": int(row["n_ctx"]),
            "csc": row["csc"] == "True", "lr": number_or_nan(row["lr"]), "epochs": int(row["epochs"]),
            "val_acc": number_or_nan(row["val_acc"]), "test_acc": number_or_nan(row["test_acc"])}


@dataclass
class ReportData:
    """Everything the page shows, as read from the stages' tables."""

    params: Params
    results_dir: Path
    baselines_dir: Path
    trial_rows: list[dict[str, str]]  # every trials.csv row, any state
    finished_trials: list[dict[str, Any]]  # the FINISHED rows, typed
    baseline_rows: list[dict[str, str]]
    domain_shift_rows: list[dict[str, str]]
    published: dict[str, Any]
    context_words: dict[str, dict[str, Any]] = field(default_factory=dict)  # dataset -> its best context's words
    notes: list[str] = field(default_factory=list)  # warnings shown at the top of the page

    @property
    def coop_points(self) -> list[AccuracyPoint]:
        return coop_points(self.finished_trials)

    @property
    def baseline_points(self) -> list[AccuracyPoint]:
        return baseline_points(self.baseline_rows)


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
    finished = [typed_trial(r) for r in trial_rows if r.get("state") == "FINISHED"]
    if any(r.get("dataset") == "ImageNet" for r in trial_rows):
        # CoOp's ImageNet has no val split: its few-shot "val" comes from the test images (val_is_test).
        notes.append("ImageNet has no validation split: as in the official code its few-shot val images come from "
                     "the test set, so the best ImageNet configuration is selected on test images.")
    baselines_path, domain_shift_path = baselines_dir / "baselines.csv", baselines_dir / "domain_shift.csv"
    baseline_rows = read_csv_rows(baselines_path) if baselines_path.is_file() else []
    domain_shift_rows = read_csv_rows(domain_shift_path) if domain_shift_path.is_file() else []
    data = ReportData(params, results_dir, baselines_dir, trial_rows, finished, baseline_rows, domain_shift_rows,
                      load_published(), notes=notes)
    data.context_words = best_context_words(data, tracking_uri)
    return data


def best_context_words(data: ReportData, tracking_uri: str | None) -> dict[str, dict[str, Any]]:
    """Per dataset, the nearest words of its best learned context (statistics.best_context_trials), from the
    sweep's contexts folder or the trial's MLflow run; datasets whose artifacts are unavailable are left out."""
    from pipeline.tracking import resolve_tracking_uri, trial_artifacts

    uri = resolve_tracking_uri(tracking_uri, data.params.tracking.uri)
    out: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="coop-report-") as tmp:
        for dataset, best in best_context_trials(data.finished_trials).items():
            folder = trial_artifacts(best, data.results_dir, Path(tmp), uri, names=("nearest_words.json",))
            if folder is None:
                continue
            words = json.loads((folder / "nearest_words.json").read_text(encoding="utf-8"))
            out[dataset] = {"trial": best, "k": words.get("k"), "vectors": words["vectors"]}
    return out
