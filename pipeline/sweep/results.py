"""The sweep's result tables: one row per trial, mean ± std over seeds per configuration, best by validation.

Files (all written atomically under sweep.results_dir):

* ``trials.csv``   one row per trial: configuration, state, val/test accuracy, node, MLflow run
* ``summary.csv``  per dataset x shots x configuration: seeds finished, mean ± std of val and test accuracy,
                   and which configuration is the best of its dataset x shots
* ``metrics.json`` DVC metrics: trial counts and, per dataset x shots, the best configuration's accuracies
* ``plots.csv``    shots vs mean test accuracy per dataset and configuration (plus each dataset's best), for
                   ``dvc plots``

(``contexts/<trial_key>/`` beside them holds each finished trial's learned context: `pipeline.sweep.contexts`.)

The best configuration is chosen on VALIDATION accuracy only, among the configurations with the most
finished seeds in their dataset x shots (a lucky single seed cannot win over a full set); test accuracy is
reported beside it and never consulted. Std is over seeds, with ddof=0 as in CoOp's result parser.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.atomic import write_csv_atomic, write_json_atomic
from pipeline.sweep.space import CONFIG_KEYS, HYPER_KEYS, config_label
from pipeline.tables import csv_number

STATES = ("FINISHED", "FAILED", "STOPPED", "UNFINISHED")
TRIAL_COLUMNS = [
    "trial_id", "trial_key", "state", *CONFIG_KEYS, "config", "last_epoch", "val_acc", "test_acc",
    "train_seconds", "node_ip", "mlflow_run_id", "reason",
]
SUMMARY_COLUMNS = [
    "dataset", "shots", "config", *HYPER_KEYS, "n_seeds", "seeds",
    "val_acc_mean", "val_acc_std", "test_acc_mean", "test_acc_std", "best",
]
PLOT_COLUMNS = ["series", "dataset", "config", "shots", "test_acc", "test_acc_std", "val_acc", "n_seeds"]


@dataclass
class TrialRecord:
    """One trial as the sweep saw it end."""

    config: dict[str, Any]
    trial_id: str = ""
    trial_key: str = ""
    state: str = "UNFINISHED"  # FINISHED | FAILED | STOPPED (early-stopped) | UNFINISHED
    val_acc: float | None = None
    test_acc: float | None = None
    train_seconds: float | None = None
    last_epoch: int | None = None  # last epoch reported to Tune (an evaluation epoch, or the final one)
    node_ip: str = ""
    mlflow_run_id: str = ""
    reason: str = ""

    def row(self) -> dict[str, Any]:
        return {
            **self.config,
            "trial_id": self.trial_id,
            "trial_key": self.trial_key,
            "state": self.state,
            "config": config_label(self.config),
            "last_epoch": "" if self.last_epoch is None else self.last_epoch,
            "val_acc": csv_number(self.val_acc),
            "test_acc": csv_number(self.test_acc),
            "train_seconds": csv_number(self.train_seconds),
            "node_ip": self.node_ip,
            "mlflow_run_id": self.mlflow_run_id,
            "reason": self.reason.replace("\n", " ")[:500],
        }


@dataclass
class ConfigSummary:
    dataset: str
    shots: int
    label: str
    config: dict[str, Any]
    seeds: list[int] = field(default_factory=list)
    val: list[float] = field(default_factory=list)
    test: list[float] = field(default_factory=list)
    best: bool = False

    @property
    def val_mean(self) -> float:
        return _mean(self.val)

    @property
    def test_mean(self) -> float:
        return _mean(self.test)

    def row(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "shots": self.shots,
            "config": self.label,
            **{k: self.config[k] for k in HYPER_KEYS},
            "n_seeds": len(self.seeds),
            "seeds": " ".join(map(str, sorted(self.seeds))),
            "val_acc_mean": csv_number(self.val_mean),
            "val_acc_std": csv_number(_std(self.val)),
            "test_acc_mean": csv_number(self.test_mean),
            "test_acc_std": csv_number(_std(self.test)),
            "best": self.best,
        }


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _mean(values: list[float]) -> float:
    values = [v for v in values if _finite(v)]
    return statistics.fmean(values) if values else math.nan


def _std(values: list[float]) -> float:
    values = [v for v in values if _finite(v)]
    return statistics.pstdev(values) if values else math.nan


def _json_number(value: float) -> float | None:
    return round(value, 4) if _finite(value) else None


def summarize(records: Sequence[TrialRecord]) -> list[ConfigSummary]:
    """Finished trials grouped by dataset x shots x configuration, best of each dataset x shots flagged."""
    groups: dict[tuple[str, int, str], ConfigSummary] = {}
    for record in records:
        if record.state != "FINISHED":
            continue
        c = record.config
        label = config_label(c)
        group = groups.setdefault(
            (c["dataset"], c["shots"], label), ConfigSummary(c["dataset"], c["shots"], label, dict(c))
        )
        group.seeds.append(c["seed"])
        group.val.append(record.val_acc if record.val_acc is not None else math.nan)
        group.test.append(record.test_acc if record.test_acc is not None else math.nan)
    summaries = sorted(groups.values(), key=lambda g: (g.dataset, g.shots, g.label))
    by_setting: dict[tuple[str, int], list[ConfigSummary]] = {}
    for summary in summaries:
        by_setting.setdefault((summary.dataset, summary.shots), []).append(summary)
    for candidates in by_setting.values():
        best = select_best(candidates)
        if best is not None:
            best.best = True
    return summaries


def select_best(candidates: Sequence[ConfigSummary]) -> ConfigSummary | None:
    """Highest mean validation accuracy among the configurations with the most seeds; test is not looked at."""
    scored = [c for c in candidates if _finite(c.val_mean)]
    if not scored:
        return None
    most = max(len(c.seeds) for c in scored)
    full = [c for c in scored if len(c.seeds) == most]
    return max(full, key=lambda c: (c.val_mean, -_std(c.val) if _finite(_std(c.val)) else 0.0))


def counts(records: Sequence[TrialRecord]) -> dict[str, int]:
    out = {"total": len(records)}
    for state in STATES:
        out[state.lower()] = sum(r.state == state for r in records)
    return out


def metrics_json(records: Sequence[TrialRecord], summaries: Sequence[ConfigSummary]) -> dict[str, Any]:
    best: dict[str, dict[str, Any]] = {}
    for s in summaries:
        if s.best:
            best.setdefault(s.dataset, {})[f"{s.shots}shot"] = {
                "val_acc": _json_number(s.val_mean),
                "val_acc_std": _json_number(_std(s.val)),
                "test_acc": _json_number(s.test_mean),
                "test_acc_std": _json_number(_std(s.test)),
                "n_seeds": len(s.seeds),
                "config": s.label,
            }
    return {"trials": counts(records), "best": best}


def plot_rows(summaries: Sequence[ConfigSummary]) -> list[dict[str, Any]]:
    rows = []
    for s in summaries:
        entry = {"dataset": s.dataset, "config": s.label, "shots": s.shots, "test_acc": csv_number(s.test_mean),
                 "test_acc_std": csv_number(_std(s.test)), "val_acc": csv_number(s.val_mean), "n_seeds": len(s.seeds)}
        rows.append({"series": f"{s.dataset} | {s.label}", **entry})
        if s.best:
            rows.append({"series": f"{s.dataset} | best by val", **entry})
    return sorted(rows, key=lambda r: (r["series"], r["shots"]))


@dataclass
class ResultFiles:
    trials: Path
    summary: Path
    metrics: Path
    plots: Path

    def all(self) -> list[Path]:
        return [self.trials, self.summary, self.metrics, self.plots]


def write_results(results_dir: Path, records: Sequence[TrialRecord]) -> ResultFiles:
    """Write the four result files; returns their paths."""
    files = ResultFiles(results_dir / "trials.csv", results_dir / "summary.csv", results_dir / "metrics.json",
                        results_dir / "plots.csv")
    ordered = sorted(records, key=lambda r: tuple(str(r.config[k]) for k in CONFIG_KEYS))
    summaries = summarize(records)
    write_csv_atomic(files.trials, TRIAL_COLUMNS, [r.row() for r in ordered])
    write_csv_atomic(files.summary, SUMMARY_COLUMNS, [s.row() for s in summaries])
    write_json_atomic(files.metrics, metrics_json(records, summaries))
    write_csv_atomic(files.plots, PLOT_COLUMNS, plot_rows(summaries))
    return files
