"""The sweep's result tables: one row per trial, mean ± std over seeds per configuration, best by validation.

Files (all written atomically under sweep.results_dir):

* ``trials.csv``   one row per trial: configuration, state, val/test accuracy (base-to-new: of the base
                   classes, with the new classes' ``new_acc`` and their harmonic mean ``h_acc``), node, MLflow run
* ``summary.csv``  per dataset x protocol x shots x configuration: seeds finished, mean ± std of val and test
                   accuracy (base-to-new: and of new, with H of the means, as CoCoOp's tables compute it), and
                   which configuration is the best of its dataset x protocol x shots
* ``transfer.csv`` cross-dataset transfer: one row per xd trial x target dataset, the target's test accuracy
* ``metrics/``     DVC metrics, one small file per dataset x shots (``WorldSketch-01shot.json``) so that
                   ``dvc metrics show`` prints a table with a row each: that setting's finished and failed
                   trials and its best configuration's seeds, mean test accuracy ± std and mean val accuracy
                   (which configuration it is: ``summary.csv``, ``plots.csv``)
* ``plots.csv``    for ``dvc plots``: one row per dataset x shots x configuration (mean test accuracy ± std,
                   val accuracy, ``best_by_val``), ``line`` naming the configuration across shots

(``contexts/<trial_key>/`` beside them holds each finished trial's learned context: `pipeline.sweep.contexts`.)

The best configuration is chosen on VALIDATION accuracy only (base-to-new: the base classes'), among the
configurations with the most finished seeds in their dataset x protocol x shots (a lucky single seed cannot win over a full set); test accuracy is
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
from pipeline.data.protocols import FEWSHOT, harmonic_mean
from pipeline.sweep.space import CONFIG_KEYS, HYPER_KEYS, complete, config_label
from pipeline.tables import csv_number

STATES = ("FINISHED", "FAILED", "STOPPED", "UNFINISHED")
TRIAL_COLUMNS = [
    "trial_id", "trial_key", "state", *CONFIG_KEYS, "config", "last_epoch", "val_acc", "test_acc", "new_acc",
    "h_acc", "train_seconds", "node_ip", "mlflow_run_id", "reason",
]
SUMMARY_COLUMNS = [
    "dataset", "protocol", "shots", "config", *HYPER_KEYS, "n_seeds", "seeds",
    "val_acc_mean", "val_acc_std", "test_acc_mean", "test_acc_std", "new_acc_mean", "new_acc_std", "h_acc", "best",
]
TRANSFER_COLUMNS = ["trial_key", "dataset", "shots", "seed", "method", "config", "target", "test_acc"]
PLOT_COLUMNS = [
    "series", "dataset", "line", "config", "shots", "test_acc", "test_acc_std", "val_acc", "n_seeds", "best_by_val",
]


@dataclass
class TrialRecord:
    """One trial as the sweep saw it end."""

    config: dict[str, Any]
    trial_id: str = ""
    trial_key: str = ""
    state: str = "UNFINISHED"  # FINISHED | FAILED | STOPPED (early-stopped) | UNFINISHED
    val_acc: float | None = None
    test_acc: float | None = None  # base-to-new: the base classes'
    new_acc: float | None = None  # base-to-new: the new classes' test accuracy, with their names
    h_acc: float | None = None  # base-to-new: harmonic mean of test_acc and new_acc
    transfer: dict[str, float] = field(default_factory=dict)  # xd: target dataset -> its test accuracy
    train_seconds: float | None = None
    last_epoch: int | None = None  # last epoch reported to Tune (an evaluation epoch, or the final one)
    node_ip: str = ""
    mlflow_run_id: str = ""
    reason: str = ""

    def __post_init__(self) -> None:
        self.config = complete(self.config)  # a resumed sweep's configs may predate keys

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
            "new_acc": csv_number(self.new_acc),
            "h_acc": csv_number(self.h_acc),
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
    new: list[float] = field(default_factory=list)  # base-to-new only
    best: bool = False

    @property
    def protocol(self) -> str:
        return self.config.get("protocol", FEWSHOT)

    @property
    def val_mean(self) -> float:
        return _mean(self.val)

    @property
    def test_mean(self) -> float:
        return _mean(self.test)

    @property
    def new_mean(self) -> float:
        return _mean(self.new)

    @property
    def h_of_means(self) -> float:
        """Base-to-new's H of the seed-mean base and new accuracies (CoCoOp's tables: H of the averages)."""
        return harmonic_mean(self.test_mean, self.new_mean)

    def row(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "protocol": self.protocol,
            "shots": self.shots,
            "config": self.label,
            **{k: self.config[k] for k in HYPER_KEYS},
            "n_seeds": len(self.seeds),
            "seeds": " ".join(map(str, sorted(self.seeds))),
            "val_acc_mean": csv_number(self.val_mean),
            "val_acc_std": csv_number(_std(self.val)),
            "test_acc_mean": csv_number(self.test_mean),
            "test_acc_std": csv_number(_std(self.test)),
            "new_acc_mean": csv_number(self.new_mean),
            "new_acc_std": csv_number(_std(self.new)),
            "h_acc": csv_number(self.h_of_means),
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


def _number(value: float | None) -> float:
    return value if value is not None else math.nan


def summarize(records: Sequence[TrialRecord]) -> list[ConfigSummary]:
    """Finished trials grouped by dataset x protocol x shots x configuration, best of each dataset x protocol x
    shots flagged."""
    groups: dict[tuple[str, str, int, str], ConfigSummary] = {}
    for record in records:
        if record.state != "FINISHED":
            continue
        c = record.config
        label = config_label(c)
        group = groups.setdefault(
            (c["dataset"], c["protocol"], c["shots"], label), ConfigSummary(c["dataset"], c["shots"], label, dict(c))
        )
        group.seeds.append(c["seed"])
        group.val.append(_number(record.val_acc))
        group.test.append(_number(record.test_acc))
        if record.new_acc is not None:
            group.new.append(record.new_acc)
    summaries = sorted(groups.values(), key=lambda g: (g.dataset, g.protocol != FEWSHOT, g.protocol, g.shots, g.label))
    by_setting: dict[tuple[str, str, int], list[ConfigSummary]] = {}
    for summary in summaries:
        by_setting.setdefault((summary.dataset, summary.protocol, summary.shots), []).append(summary)
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


def metrics_files(records: Sequence[TrialRecord], summaries: Sequence[ConfigSummary]) -> dict[str, dict[str, Any]]:
    """DVC metrics: file name -> content, one file per dataset x shots that has trials.

    DVC prints one row per metrics file (a single file's keys would all flatten into one very wide row), so
    each setting gets a file with a few flat keys; shots are zero-padded so the rows sort by shots.
    """
    settings = sorted({(r.config["dataset"], r.config["protocol"], r.config["shots"]) for r in records})
    width = max((len(str(shots)) for _, _, shots in settings), default=1)
    best = {(s.dataset, s.protocol, s.shots): s for s in summaries if s.best}
    files = {}
    for setting in settings:
        dataset, protocol, shots = setting
        states = [r.state for r in records
                  if (r.config["dataset"], r.config["protocol"], r.config["shots"]) == setting]
        content: dict[str, Any] = {"finished": states.count("FINISHED"), "failed": states.count("FAILED")}
        winner = best.get(setting)
        if winner is not None:
            content.update(n_seeds=len(winner.seeds), test_acc=_json_number(winner.test_mean),
                           test_acc_std=_json_number(_std(winner.test)), val_acc=_json_number(winner.val_mean))
            if winner.new:
                content.update(new_acc=_json_number(winner.new_mean), h_acc=_json_number(winner.h_of_means))
        suffix = "" if protocol == FEWSHOT else f"-{protocol}"
        files[f"{dataset}-{shots:0{width}d}shot{suffix}.json"] = content
    return files


def line_labels(summaries: Sequence[ConfigSummary]) -> dict[tuple[str, str], str]:
    """(dataset, config label) -> the name of its line across shots in the plots.

    With CoOp's per-shot epochs (50 for 1 shot, 200 for 16) the same configuration has a different label at
    each shots value; the line drops the epochs unless they are a real choice in that dataset (two
    configurations of one dataset x shots that differ only in epochs), which keeps them apart.
    """
    without_epochs: dict[tuple[str, str, int, str], set[int]] = {}
    for s in summaries:
        without_epochs.setdefault((s.dataset, s.protocol, s.shots, config_label(s.config, epochs=False)), set()).add(
            s.config["epochs"])
    epochs_chosen = {dataset for (dataset, _, _, _), epochs in without_epochs.items() if len(epochs) > 1}
    return {(s.dataset, s.label): s.label if s.dataset in epochs_chosen else config_label(s.config, epochs=False)
            for s in summaries}


def plot_rows(summaries: Sequence[ConfigSummary]) -> list[dict[str, Any]]:
    """One row per dataset x shots x configuration; `series` (dataset | line) is one line across shots."""
    lines = line_labels(summaries)
    rows = []
    for s in summaries:
        line = lines[(s.dataset, s.label)]
        if s.protocol != FEWSHOT:  # base-to-new's test accuracy is the base classes': its own line
            line = f"{line} [{s.protocol}]"
        rows.append({"series": f"{s.dataset} | {line}", "dataset": s.dataset, "line": line, "config": s.label,
                     "shots": s.shots, "test_acc": csv_number(s.test_mean), "test_acc_std": csv_number(_std(s.test)),
                     "val_acc": csv_number(s.val_mean), "n_seeds": len(s.seeds),
                     "best_by_val": "yes" if s.best else "no"})
    return sorted(rows, key=lambda r: (r["series"], r["shots"]))


def transfer_rows(records: Sequence[TrialRecord]) -> list[dict[str, Any]]:
    """transfer.csv: one row per finished xd trial x target."""
    rows = []
    for r in records:
        if r.state != "FINISHED":
            continue
        for target, acc in sorted(r.transfer.items()):
            rows.append({"trial_key": r.trial_key, "dataset": r.config["dataset"], "shots": r.config["shots"],
                         "seed": r.config["seed"], "method": r.config["method"], "config": config_label(r.config),
                         "target": target, "test_acc": csv_number(acc)})
    return rows


@dataclass
class ResultFiles:
    trials: Path
    summary: Path
    metrics: Path  # a folder: one file per dataset x shots
    plots: Path
    transfer: Path

    def all(self) -> list[Path]:
        """The tables (logged with the parent run); the metrics files only repeat summary.csv's best rows."""
        return [self.trials, self.summary, self.plots, self.transfer]


def write_results(results_dir: Path, records: Sequence[TrialRecord]) -> ResultFiles:
    """Write the result tables and the metrics folder; returns their paths."""
    files = ResultFiles(results_dir / "trials.csv", results_dir / "summary.csv", results_dir / "metrics",
                        results_dir / "plots.csv", results_dir / "transfer.csv")
    ordered = sorted(records, key=lambda r: tuple(str(r.config[k]) for k in CONFIG_KEYS))
    summaries = summarize(records)
    write_csv_atomic(files.trials, TRIAL_COLUMNS, [r.row() for r in ordered])
    write_csv_atomic(files.summary, SUMMARY_COLUMNS, [s.row() for s in summaries])
    metrics = metrics_files(records, summaries)
    files.metrics.mkdir(parents=True, exist_ok=True)  # DVC expects the folder even when no trial ran
    for name, content in metrics.items():
        write_json_atomic(files.metrics / name, content)
    for stale in files.metrics.glob("*.json"):  # settings of an earlier sweep in the same folder
        if stale.name not in metrics:
            stale.unlink()
    write_csv_atomic(files.plots, PLOT_COLUMNS, plot_rows(summaries))
    write_csv_atomic(files.transfer, TRANSFER_COLUMNS, transfer_rows(records))
    return files
