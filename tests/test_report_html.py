"""The report page from hand-made result tables: what each section shows, how it says "no data", and that the
page is self-contained (every image inline, no empty table)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest
from report_helpers import check_html, params_for, sections, write_csv

from pipeline.params import params_from_dict
from pipeline.report import write_report
from pipeline.report.collect import collect
from pipeline.report.html import difference_text, first_class_context, mean_std_text, render


def test_page_shows_the_val_selected_results_next_to_the_paper(report_workspace: dict[str, Any]) -> None:
    html = render(collect(report_workspace["params"]))
    assert check_html(html) == []
    parts = sections(html)
    assert list(parts) == ["accuracy", "published", "domain", "words", "sweep"]
    published = parts["published"]
    # lr=0.002 wins on val (95 vs 85) though lr=0.02 is better on test: 91.5 = (91 + 92) / 2, paper 91.83.
    assert "91.50 ± 0.50" in published and "91.83" in published and "-0.33" in published
    assert "86.00" in published  # our zero-shot; the paper's is ImageNet-only
    assert "not a reproduction result" not in published  # RN50/openai, like the paper
    numbers = parts["accuracy"]
    assert "<img" in numbers
    assert "62.50 ± 0.50" in numbers and "77.50 ± 0.50" in numbers  # linear probe: 60 + shots + seed
    # No ImageNet, no contexts: those sections say so in one line instead of an empty table.
    assert parts["domain"].count('class="empty"') == 1 and "<table" not in parts["domain"]
    assert parts["words"].count('class="empty"') == 1 and "<table" not in parts["words"]
    assert "1 failed" in html and "12 finished" in html


def test_sweep_section_shows_effects_and_importances(report_workspace: dict[str, Any]) -> None:
    sweep = sections(render(collect(report_workspace["params"])))["sweep"]
    assert "<img" in sweep and "fANOVA" in sweep
    assert "learning rate" in sweep and "class-specific context (CSC)" in sweep


def test_words_section_shows_the_first_class_context(report_workspace: dict[str, Any]) -> None:
    root = report_workspace["root"]
    rows = [r for r in report_workspace["rows"] if r["state"] == "FINISHED" and r["shots"] == 16]
    for r in rows:
        folder = root / "out" / "sweep" / "contexts" / r["trial_key"]
        folder.mkdir(parents=True)
        vectors = [{"class": None, "position": i + 1, "words": [{"word": f"word{i}", "distance": 0.25}]}
                   for i in range(16)]
        (folder / "nearest_words.json").write_text(json.dumps({"k": 1, "vectors": vectors}))
    words = sections(render(collect(report_workspace["params"])))["words"]
    assert "word0" in words and "word15" in words and "<th>v16</th>" in words and "<th>v17</th>" not in words
    assert "seed 1" in words and "val 95.0%" in words


def test_first_class_context_tells_classes_apart_by_label() -> None:
    vectors = [{"class": "missile", "label": 0, "position": 1}, {"class": "missile", "label": 0, "position": 2},
               {"class": "missile", "label": 2, "position": 1}]
    assert first_class_context(vectors) == vectors[:2]
    unlabelled = [{"class": None, "position": p} for p in (1, 2)]
    assert first_class_context(unlabelled) == unlabelled


def test_domain_section_tables_the_shifted_sets(report_workspace: dict[str, Any]) -> None:
    columns = ["method", "n_ctx", "ctx_init", "csc", "class_token_position", "source", "target", "shots", "seed",
               "test_acc"]
    rows = [{"method": "CoOp", "n_ctx": 16, "ctx_init": "", "csc": False, "class_token_position": "end",
             "source": "ImageNet", "target": target, "shots": 16, "seed": 1, "test_acc": acc}
            for target, acc in (("ImageNet", 60), ("ImageNetV2", 50), ("ImageNetSketch", 30))]
    write_csv(Path(report_workspace["params"].report.baselines_dir) / "domain_shift.csv", columns, rows)
    domain = sections(render(collect(report_workspace["params"])))["domain"]
    assert "ImageNet (source)" in domain and "ImageNetV2" in domain and "average (targets)" in domain
    assert "<td>40.00</td>" in domain  # (50 + 30) / 2: the source does not count
    assert "learned on ImageNet with 16 shots" in domain


def test_domain_shift_without_imagenet_writes_an_empty_table(report_workspace: dict[str, Any], tmp_path: Path) -> None:
    from pipeline.evaluate.domain_shift import COLUMNS, run_domain_shift

    out = tmp_path / "ds"
    assert run_domain_shift(report_workspace["params"], out, progress=False) == []
    with (out / "domain_shift.csv").open() as f:
        assert f.read().strip() == ",".join(COLUMNS)
    params = report_workspace["params"]
    params = dataclasses.replace(params, report=dataclasses.replace(params.report, baselines_dir=str(out)))
    assert "No domain-shift results" in sections(render(collect(params)))["domain"]


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


def test_random_weights_are_flagged(tmp_path: Path) -> None:
    params = params_from_dict({**params_for(tmp_path).to_dict(), "backbone": {"arch": "coop-tiny", "pretrained": None}})
    html = write_report(params, mlflow=False).read_text()
    assert "This backbone has random weights" in html


def test_check_html_catches_external_images_and_empty_tables() -> None:
    bad = '<img src="plot.png"><table><thead><tr><th>a</th></tr></thead><tbody></tbody></table>'
    assert len(check_html(bad)) == 2


@pytest.mark.parametrize(("args", "text"), [((91.5, 0.5, 2), "91.50 ± 0.50"), ((91.5, 0.5, 1), "91.50"),
                                            ((91.5,), "91.50"), ((math.nan, 1.0, 3), "–")])
def test_mean_std_text(args: tuple[float, ...], text: str) -> None:
    assert mean_std_text(*args) == text


def test_difference_text_is_signed() -> None:
    assert (difference_text(0.334), difference_text(-0.33), difference_text(math.nan)) == ("+0.33", "-0.33", "–")
