"""What the report reads: trials by state, the baselines tables, notes on missing inputs, the best contexts' words."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from report_helpers import params_for, trial_row, write_csv

from pipeline.report.collect import collect
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


def test_nearest_words_come_from_the_best_unified_context(report_workspace: dict[str, Any]) -> None:
    root = report_workspace["root"]
    rows = [r for r in report_workspace["rows"] if r["state"] == "FINISHED" and r["shots"] == 16]
    best = max((r for r in rows if not r["csc"]), key=lambda r: (r["val_acc"], -r["seed"]))
    for r in rows:  # the sweep's local contexts folder, one per trial
        folder = root / "out" / "sweep" / "contexts" / r["trial_key"]
        folder.mkdir(parents=True)
        word = "chosen" if r is best else "other"
        vectors = [{"class": None, "position": i + 1, "words": [{"word": f"{word}{i}", "distance": 0.5}]}
                   for i in range(16)]
        (folder / "nearest_words.json").write_text(json.dumps({"k": 1, "vectors": vectors}))
    (entry,) = collect(report_workspace["params"]).context_words.values()
    assert entry["trial"]["trial_key"] == best["trial_key"] and entry["k"] == 1
    assert [v["words"][0]["word"] for v in entry["vectors"]] == [f"chosen{i}" for i in range(16)]
