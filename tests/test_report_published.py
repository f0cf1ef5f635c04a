"""The published numbers the report shows (pipeline/data/published.json): each table agrees with itself as printed
(averages are the mean of the per-dataset rows, H the harmonic mean of base and new) and names its source."""

from __future__ import annotations

from statistics import fmean

import pytest

from pipeline.data.datasets import resolve_name
from pipeline.data.published import base_to_new_rows, cross_dataset_rows, load_published
from pipeline.evaluate.methods import LEARNED_METHOD_NAMES, ZERO_SHOT

# The papers print every number rounded to 2 decimals; a mean or an H recomputed from printed numbers is off by
# at most 0.005 in these tables (CLIP's base: its rows average 69.3445, printed 69.34), so 0.01 allows the
# rounding. A mistyped row shows in its own H (the copies found had four such cells) more surely than in an
# 11-row mean, which a typo moves by a tenth of its size: both are checked.
ROUNDING = 0.01
PAPER_DATASETS = ["ImageNet", "Caltech101", "OxfordPets", "StanfordCars", "OxfordFlowers", "Food101",
                  "FGVCAircraft", "SUN397", "DTD", "EuroSAT", "UCF101"]


def harmonic(base: float, new: float) -> float:
    return 2 * base * new / (base + new)


@pytest.fixture(scope="module")
def published() -> dict:
    return load_published()


def test_base_to_new_rows_have_their_own_h_and_the_printed_averages(published: dict) -> None:
    rows = base_to_new_rows(published)
    assert [r.name for r in rows] == ["CLIP", "CoOp", "CoCoOp", "KgCoOp"]
    for r in rows:
        assert abs(harmonic(r.average.base, r.average.new) - r.average.h) <= ROUNDING, r.name
        if not r.datasets:
            continue
        assert list(r.datasets) == PAPER_DATASETS, r.name
        for dataset, cell in r.datasets.items():
            assert abs(harmonic(cell.base, cell.new) - cell.h) <= ROUNDING, (r.name, dataset)
        assert abs(fmean(c.base for c in r.datasets.values()) - r.average.base) <= ROUNDING, r.name
        assert abs(fmean(c.new for c in r.datasets.values()) - r.average.new) <= ROUNDING, r.name
    assert {r.name for r in rows if r.datasets} == {"CLIP", "CoOp", "CoCoOp"}  # KgCoOp: average only (see JSON)


def test_the_averages_the_brief_and_the_papers_give(published: dict) -> None:
    averages = {r.name: (r.average.base, r.average.new, r.average.h) for r in base_to_new_rows(published)}
    assert averages == {"CLIP": (69.34, 74.22, 71.70), "CoOp": (82.69, 63.22, 71.66),
                        "CoCoOp": (80.47, 71.69, 75.83), "KgCoOp": (80.73, 73.60, 77.00)}


def test_cross_dataset_averages_are_the_mean_of_the_targets(published: dict) -> None:
    block = published["cross_dataset"]
    rows = cross_dataset_rows(published)
    assert [r.name for r in rows] == ["CoOp", "CoCoOp"]
    for r in rows:
        assert list(r.targets) == [d for d in PAPER_DATASETS if d != block["source_dataset"]]
        assert abs(fmean(r.targets.values()) - r.average) <= ROUNDING, r.name


def test_names_match_the_sweeps(published: dict) -> None:
    """Dataset names are the registry's (so the report finds the sweep's datasets in them), methods the sweep's."""
    for name in PAPER_DATASETS:
        info = resolve_name(name)
        assert info is not None and info.name == name
    for r in base_to_new_rows(published):
        assert r.method in (*LEARNED_METHOD_NAMES, ZERO_SHOT)
    for r in cross_dataset_rows(published):
        assert r.method in LEARNED_METHOD_NAMES


@pytest.mark.parametrize("block", ["coop_16shot", "zero_shot", "base_to_new", "cross_dataset"])
def test_every_table_names_its_source_and_backbone(published: dict, block: str) -> None:
    assert published[block]["source"] and published[block]["backbone"]["arch"]
    if block in ("base_to_new", "cross_dataset"):
        assert "Table" in published[block]["source"] and published[block]["found_in"]
