"""The report's base-to-new and cross-dataset sections from a hand-made trials.csv and transfer.csv: every number
against a straightforward computation (selection by seed-averaged val, mean ± std and 95% CI over seeds, H of the
seed means), the published rows beside them, the sections only when the sweep has such trials, and a trials.csv
written before methods and protocols were sweep dimensions."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from statistics import fmean, pstdev
from typing import Any

import numpy as np
import pytest
from report_helpers import (
    BASELINE_COLUMNS,
    PROTOCOL_DATASETS,
    TRANSFER_COLUMNS,
    TRIAL_COLUMNS_V1,
    TRIAL_COLUMNS_V2,
    build_protocols_workspace,
    check_html,
    params_for,
    protocol_label,
    sections,
    tables,
    trial_row,
    write_csv,
)

from pipeline.data.published import load_published
from pipeline.report.collect import collect
from pipeline.report.html import render

METHODS = {"coop": "CoOp", "cocoop": "CoCoOp"}


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    workspace = build_protocols_workspace(tmp_path_factory.mktemp("protocols"))
    html = render(collect(workspace["params"]))
    assert check_html(html) == []
    return {**workspace, "html": html, "sections": sections(html)}


def selected(rows: list[dict[str, Any]], protocol: str, method: str, dataset: str) -> list[dict[str, Any]]:
    """The configuration with the best mean val accuracy over seeds (every configuration here has both seeds)."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if (r["protocol"], r["method"], r["dataset"]) == (protocol, method, dataset):
            groups[r["config"]].append(r)
    return max(groups.values(), key=lambda g: fmean(r["val_acc"] for r in g))


def with_ci(values: list[float]) -> str:
    """A cell as the papers' tables show it: mean ± population std, the 95% CI of CoOp's parse_test_res.py below."""
    ci = 1.96 * np.std(values) / np.sqrt(len(values))
    return f"{fmean(values):.2f} ± {pstdev(values):.2f} | CI ± {ci:.2f}"


def harmonic(base: float, new: float) -> float:
    return 2 * base * new / (base + new)


def table_with(html: str, first: list[str]) -> list[list[str]]:
    return next(t for t in tables(html) if t[0][:len(first)] == first)


def test_the_fixture_writes_what_the_sweep_writes(page: dict[str, Any], tmp_path: Path) -> None:
    """The hand-made tables have the sweep's columns, file name and configuration labels."""
    from pipeline.report.collect import TRANSFER_FILE
    from pipeline.sweep import results
    from pipeline.sweep.space import config_label

    assert (results.TRIAL_COLUMNS, results.TRANSFER_COLUMNS) == (TRIAL_COLUMNS_V2, TRANSFER_COLUMNS)
    assert results.write_results(tmp_path, []).transfer == tmp_path / TRANSFER_FILE
    for row in page["rows"]:
        assert config_label(row) == row["config"] == protocol_label(row)


def test_sections_follow_the_published_ones(page: dict[str, Any]) -> None:
    assert list(page["sections"]) == ["accuracy", "published", "base2new", "transfer", "domain", "words", "sweep"]
    header = tables(page["html"].split('<h2 id="')[0])[0]
    assert ["protocols, methods", "few-shot 4, base-to-new 16, cross-dataset transfer 16 trials; CoOp, CoCoOp"] in header


def test_base_to_new_rows_are_the_val_selected_configuration_with_h_of_the_seed_means(page: dict[str, Any]) -> None:
    section = page["sections"]["base2new"]
    assert "best validation accuracy on the base classes averaged over seeds" in section
    header, *rows = table_with(section, ["dataset", "method", "selected configuration"])
    assert header == ["dataset", "method", "selected configuration", "Base", "New", "H"]
    by_key = {(r[0], r[1]): r for r in rows}
    base_means: dict[str, list[float]] = defaultdict(list)
    new_means: dict[str, list[float]] = defaultdict(list)
    for dataset in PROTOCOL_DATASETS:
        for method, name in METHODS.items():
            group = selected(page["rows"], "base2new", method, dataset)
            base, new = [r["test_acc"] for r in group], [r["new_acc"] for r in group]
            row = by_key[(dataset, name)]
            assert row[2].startswith(group[0]["config"]), row
            assert f"base val {fmean(r['val_acc'] for r in group):.2f}" in row[2]
            assert (row[3], row[4]) == (with_ci(base), with_ci(new))
            seeds_h = [r["h_acc"] for r in group]
            assert row[5] == (f"{harmonic(fmean(base), fmean(new)):.2f} | per seed {fmean(seeds_h):.2f} ± "
                              f"{pstdev(seeds_h):.2f}")
            base_means[name].append(fmean(base))
            new_means[name].append(fmean(new))
    for name in METHODS.values():
        average = by_key[("Average (2 datasets)", name)]
        b, n = fmean(base_means[name]), fmean(new_means[name])
        assert average[3:] == [f"{b:.2f}", f"{n:.2f}", f"{harmonic(b, n):.2f}"]  # H of the averages


def test_the_val_winner_is_not_the_test_winner_here(page: dict[str, Any]) -> None:
    """The fixture's second configuration is better on test: the selection above would catch a test-based pick."""
    for dataset in PROTOCOL_DATASETS:
        for method in METHODS:
            chosen = selected(page["rows"], "base2new", method, dataset)
            others = [r for r in page["rows"] if (r["protocol"], r["method"], r["dataset"]) ==
                      ("base2new", method, dataset) and r["config"] != chosen[0]["config"]]
            assert fmean(r["test_acc"] for r in others) > fmean(r["test_acc"] for r in chosen)


def test_published_base_to_new_rows_are_labelled_with_their_backbone(page: dict[str, Any]) -> None:
    section = page["sections"]["base2new"]
    published = load_published()["base_to_new"]["methods"]
    header, *rows = table_with(section, ["dataset", "method", "Base", "New", "H"])
    for dataset in PROTOCOL_DATASETS:
        for name in ("CLIP", "CoOp", "CoCoOp"):
            cell = published[name]["datasets"][dataset]
            assert [dataset, f"{name} (published)", f"{cell['base']:.2f}", f"{cell['new']:.2f}",
                    f"{cell['h']:.2f}"] in rows
    assert ["Average (11 datasets)", "KgCoOp (published)", "80.73", "73.60", "77.00"] in rows
    assert ["Average (11 datasets)", "CoCoOp (published)", "80.47", "71.69", "75.83"] in rows
    assert not any(r[0] == "DTD" and r[1] == "KgCoOp (published)" for r in rows)  # no per-dataset KgCoOp row
    # RN50/openai here, ViT-B-16/openai there: said in so many words.
    assert "Our backbone is RN50/openai, the published numbers are ViT-B-16/openai" in section
    assert "not numbers comparable with ours" in section and "Table 1" in section


def test_transfer_rows_are_the_val_selected_source_configuration_on_each_target(page: dict[str, Any]) -> None:
    section = page["sections"]["transfer"]
    assert "validation accuracy on the source averaged over seeds" in section
    transfer = {(r["trial_key"], r["target"]): r["test_acc"] for r in page["transfer"]}
    for source in PROTOCOL_DATASETS:
        (target,) = [d for d in PROTOCOL_DATASETS if d != source]
        header, *rows = table_with(section, ["method (selected configuration)", f"{source} (source)"])
        assert header == ["method (selected configuration)", f"{source} (source)", target, "average (targets)"]
        for (method, name), row in zip(METHODS.items(), rows, strict=True):
            group = selected(page["rows"], "xd", method, source)
            source_acc = [r["test_acc"] for r in group]
            target_acc = [transfer[(r["trial_key"], target)] for r in group]
            assert row[0].startswith(name) and group[0]["config"] in row[0]
            assert row[1:] == [f"{fmean(source_acc):.2f} ± {pstdev(source_acc):.2f}",
                               f"{fmean(target_acc):.2f} ± {pstdev(target_acc):.2f}",
                               f"{fmean(target_acc):.2f}"]  # one target: the average is its mean
            ci = 1.96 * np.std(target_acc) / np.sqrt(2)
            assert f'title="2 seeds; 95% CI ± {ci:.2f}"' in section


def test_published_transfer_rows_are_cocoops_table_2(page: dict[str, Any]) -> None:
    section = page["sections"]["transfer"]
    header, *rows = table_with(section, ["method", "ImageNet (source)"])
    assert header[2:] == ["Caltech101", "OxfordPets", "StanfordCars", "OxfordFlowers", "Food101", "FGVCAircraft",
                          "SUN397", "DTD", "EuroSAT", "UCF101", "average (targets)"]
    assert rows[0][:3] == ["CoOp (published)", "71.51", "93.70"] and rows[0][-1] == "63.88"
    assert rows[1][:3] == ["CoCoOp (published)", "71.02", "94.43"] and rows[1][-1] == "65.74"
    assert "Table 2" in section and "ViT-B-16/openai" in section


def test_few_shot_tables_hold_few_shot_trials_only(page: dict[str, Any]) -> None:
    accuracy = page["sections"]["accuracy"]
    header, *rows = table_with(accuracy, ["method", "Caltech101"])
    coop = next(r for r in rows if r[0] == "CoOp M=16, end, unified")
    assert coop[1] == with_ci([61.0, 62.0])  # few-shot rows: 60 + seed; base-to-new and xd ones are 64-83
    assert not any(r[0].startswith("CoCoOp") for r in rows)  # CoCoOp ran base-to-new and xd only
    assert "<td>61.50 ± 0.50</td>" in page["sections"]["published"]


def test_sweep_section_compares_within_a_method_and_protocol(page: dict[str, Any]) -> None:
    sweep = page["sections"]["sweep"]
    header, *rows = table_with(sweep, ["hyperparameter", "difference"])
    assert sorted(r[:2] for r in rows) == [["CoCoOp Meta-Net reduction r", "r=16 − r=8"],
                                           ["learning rate", "lr 0.02 − lr 0.002"]]
    # Each pair: same dataset, protocol, method and seed: 2 datasets x 2 protocols x 2 seeds.
    assert [r[3] for r in rows] == ["8", "8"]


def test_sections_are_absent_without_such_trials(tmp_path: Path) -> None:
    rows = [trial_row(d, 16, s, val=70.0, test=60.0 + s) for d in PROTOCOL_DATASETS for s in (1, 2)]
    write_csv(tmp_path / "out" / "sweep" / "trials.csv", TRIAL_COLUMNS_V2, rows)
    params = params_for(tmp_path, PROTOCOL_DATASETS)
    assert list(sections(render(collect(params)))) == ["accuracy", "published", "domain", "words", "sweep"]
    b2n = [{**trial_row("DTD", 16, 1, val=70.0, test=60.0, protocol="base2new"), "new_acc": 50.0, "h_acc": 54.5}]
    write_csv(tmp_path / "out" / "sweep" / "trials.csv", TRIAL_COLUMNS_V2, rows + b2n)
    assert "transfer" not in sections(render(collect(params))) and "base2new" in sections(render(collect(params)))


def test_xd_trials_without_transfer_results_show_the_source_and_say_what_is_missing(tmp_path: Path) -> None:
    workspace = build_protocols_workspace(tmp_path)
    (tmp_path / "out" / "sweep" / "transfer.csv").unlink()
    section = sections(render(collect(workspace["params"])))["transfer"]
    assert "transfer.csv has no Caltech101 rows" in section
    header, *rows = table_with(section, ["method (selected configuration)", "Caltech101 (source)"])
    assert header[-1] == "average (targets)" and len(rows) == 2 and rows[0][-1] == "–"


def test_a_trials_csv_from_before_methods_and_protocols_still_renders(tmp_path: Path) -> None:
    rows = [trial_row("Caltech101", 16, s, val=70.0, test=60.0 + s) for s in (1, 2)]
    write_csv(tmp_path / "out" / "sweep" / "trials.csv", TRIAL_COLUMNS_V1, rows)
    assert "protocol" not in (tmp_path / "out" / "sweep" / "trials.csv").read_text().splitlines()[0]
    data = collect(params_for(tmp_path))
    trial = data.finished_trials[0]
    assert (trial["protocol"], trial["method"], trial["batch_size"], trial["kg_weight"]) == ("fewshot", "coop", None,
                                                                                            None)
    assert math.isnan(trial["new_acc"])
    html = render(data)
    assert check_html(html) == []
    parts = sections(html)
    assert list(parts) == ["accuracy", "published", "domain", "words", "sweep"]
    assert "61.50 ± 0.50" in parts["accuracy"] and "61.50 ± 0.50" in parts["published"]


def test_zero_shot_clip_rows_come_from_the_baselines_base_and_new_halves(tmp_path: Path) -> None:
    """CoCoOp Table 1's CLIP row (baselines.csv's zero-shot rows on each half) heads each dataset's base-to-new
    rows, and zero-shot CLIP on every dataset heads each transfer table; neither leaks into the few-shot figure."""
    workspace = build_protocols_workspace(tmp_path)
    zero = {"Caltech101": {"": 86.0, "base": 90.0, "new": 80.0}, "DTD": {"": 44.0, "base": 50.0, "new": 40.0}}
    rows = [{"method": "zero-shot", "protocol": half, "dataset": d, "shots": 0, "seed": 0, "val_acc": "",
             "test_acc": acc} for d, halves in zero.items() for half, acc in halves.items()]
    write_csv(tmp_path / "out" / "baselines" / "baselines.csv", ["method", "protocol", *BASELINE_COLUMNS[1:]], rows)
    data = collect(workspace["params"])
    assert {(p.dataset, p.mean) for p in data.baseline_points} == {("Caltech101", 86.0), ("DTD", 44.0)}
    html = render(data)
    b2n = table_with(sections(html)["base2new"], ["dataset", "method", "selected configuration"])
    for dataset, halves in zero.items():
        row = next(r for r in b2n if r[:2] == [dataset, "Zero-shot CLIP"])
        assert row[3:] == [f"{halves['base']:.2f}", f"{halves['new']:.2f}",
                           f"{harmonic(halves['base'], halves['new']):.2f}"]
        assert b2n.index(row) < b2n.index(next(r for r in b2n if r[:2] == [dataset, "CoOp"]))  # CLIP first
    average = next(r for r in b2n if r[:2] == ["Average (2 datasets)", "Zero-shot CLIP"])
    assert average[3:5] == ["70.00", "60.00"]
    for source in PROTOCOL_DATASETS:
        (target,) = [d for d in PROTOCOL_DATASETS if d != source]
        _, first, *_ = table_with(sections(html)["transfer"], ["method (selected configuration)", f"{source} (source)"])
        assert first[0].startswith("Zero-shot CLIP")
        assert first[1:] == [f"{zero[source]['']:.2f}", f"{zero[target]['']:.2f}", f"{zero[target]['']:.2f}"]
