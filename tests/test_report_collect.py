"""What the report reads: trials by state, the baselines tables, notes on missing inputs, the sweep's search,
why there are no domain-shift results, the best contexts' words."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from report_helpers import params_for, trial_row, write_csv

from pipeline.params import override
from pipeline.report.collect import collect, domain_shift_gap, sweep_search
from pipeline.sweep.results import TRIAL_COLUMNS


def test_collect_reads_the_tables_and_keeps_finished_trials_typed(report_workspace: dict[str, Any]) -> None:
    data = collect(report_workspace["params"])
    assert len(data.trial_rows) == 13 and len(data.finished_trials) == 12  # one FAILED
    first = data.finished_trials[0]
    assert (first["shots"], first["csc"], first["lr"], first["val_acc"]) == (1, False, 0.002, 85.0)
    assert len(data.baseline_rows) == 5 and data.domain_shift_rows == []
    assert data.published["coop_16shot"]["accuracy"]["Caltech101"] == 91.83
    assert data.notes == [] and data.context_words == {}  # the sweep wrote no contexts here


def test_missing_trials_and_imagenet_selection_are_noted(tmp_path: Path) -> None:
    params = params_for(tmp_path, ["ImageNet", "Caltech101"])
    (missing,) = collect(params).notes
    assert "trials.csv does not exist" in missing
    write_csv(tmp_path / "out" / "sweep" / "trials.csv", TRIAL_COLUMNS, [trial_row("ImageNet", 16, 1, 60.0, 61.0)])
    (imagenet,) = collect(params).notes
    assert "ImageNet has no validation split" in imagenet


def write_words(root: Path, rows: list[dict[str, Any]], word_of: Any) -> None:
    """A nearest_words.json in the sweep's local contexts folder of each trial, its words named by word_of(row)."""
    for r in rows:
        folder = root / "out" / "sweep" / "contexts" / r["trial_key"]
        folder.mkdir(parents=True)
        vectors = [{"class": None, "position": i + 1, "words": [{"word": f"{word_of(r)}{i}", "distance": 0.5}]}
                   for i in range(16)]
        (folder / "nearest_words.json").write_text(json.dumps({"k": 1, "vectors": vectors}))


def test_nearest_words_of_the_best_context_and_of_the_best_unified_one(report_workspace: dict[str, Any]) -> None:
    root = report_workspace["root"]
    rows = [r for r in report_workspace["rows"] if r["state"] == "FINISHED" and r["shots"] == 16]
    best = max(rows, key=lambda r: (r["val_acc"], -r["seed"]))
    assert not best["csc"]  # in this workspace the best context is unified: only it is shown
    write_words(root, rows, lambda r: "chosen" if r is best else "other")
    (entries,) = collect(report_workspace["params"]).context_words.values()
    assert [(e["role"], e["trial"]["trial_key"], e["k"]) for e in entries] == [("best", best["trial_key"], 1)]
    assert [v["words"][0]["word"] for v in entries[0]["vectors"]] == [f"chosen{i}" for i in range(16)]


def test_a_csc_context_best_on_val_is_shown_beside_the_best_unified(tmp_path: Path) -> None:
    rows = [trial_row("Caltech101", 16, 1, val=90.0, test=80.0),
            trial_row("Caltech101", 16, 1, val=95.0, test=70.0, csc=True)]  # not passed over any more
    write_csv(tmp_path / "out" / "sweep" / "trials.csv", TRIAL_COLUMNS, rows)
    write_words(tmp_path, rows, lambda r: "csc" if r["csc"] else "unified")
    (entries,) = collect(params_for(tmp_path)).context_words.values()
    assert [(e["role"], e["trial"]["csc"], e["vectors"][0]["words"][0]["word"]) for e in entries] == [
        ("best", True, "csc0"), ("best unified", False, "unified0")]


def test_the_search_is_the_recorded_sweeps(tmp_path: Path) -> None:
    params = params_for(tmp_path)
    assert sweep_search(params)[0] == "grid"  # nothing recorded: the params' sweep.search
    storage = Path(params.sweep.storage)
    storage.mkdir(parents=True)
    (storage / "latest.json").write_text(json.dumps({"name": "tpe-1"}))
    (storage / "tpe-1.sweep.json").write_text(json.dumps({"name": "tpe-1", "search": "optuna"}))
    search, source = sweep_search(params)
    assert search == "optuna" and "tpe-1.sweep.json" in source
    write_csv(tmp_path / "out" / "sweep" / "trials.csv", TRIAL_COLUMNS, [trial_row("Caltech101", 1, 1, 50, 50)])
    data = collect(params)
    assert data.search == "optuna" and data.finished_trials[0]["search"] == "optuna"


@pytest.mark.parametrize(("change", "message"), [
    ({}, "does not exist: run the domain-shift stage"),
    ({"domain_shift": {"source": "ImageNet"}}, "domain_shift.source = ImageNet is not in data.datasets "
                                               "(Caltech101, Sketchy)"),
    ({"domain_shift": {"targets": ["ImageNetV2"]}}, "none of the shifted test sets in domain_shift.targets "
                                                    "(ImageNetV2) is in data.datasets"),
    ({"trials": []}, "the sweep has no finished Caltech101 trial"),
    ({"trials": [trial_row("Caltech101", 1, 1, 50, 50)]}, "predates them; rerun dvc repro domain_shift"),
])
def test_missing_domain_shift_results_say_what_is_missing(tmp_path: Path, change: dict[str, Any],
                                                          message: str) -> None:
    params = override(params_for(tmp_path, ["Caltech101", "Sketchy"]),
                      domain_shift={"source": "Caltech101", "targets": ["Sketchy"], **change.get("domain_shift", {})})
    csv_path = tmp_path / "domain_shift.csv"
    if change:
        csv_path.write_text("method,target\n")  # the stage ran and wrote an empty table
    assert message in domain_shift_gap(params, change.get("trials", []), csv_path)
