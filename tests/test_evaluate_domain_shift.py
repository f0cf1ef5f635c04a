"""The domain-shift stage's library: what it needs before it runs, variant classes matched by ImageNet label.

Transfer itself is checked end to end in test_paper_grid.py and on CLIP's real class list in
test_classnames.py; an empty table without ImageNet (and the report's line for it) in test_report_html.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.data.fewshot import EvalList
from pipeline.evaluate.domain_shift import run_domain_shift, subset_rows
from pipeline.evaluate.inputs import StageError
from pipeline.params import params_from_dict


def variant(labels: list[int] | None) -> EvalList:
    names = [f"class {i}" for i in range(len(labels or [0, 1]))]
    return EvalList(dataset="ImageNetA", classnames=names, template="a photo of a {}.", test=[],
                    imagenet_labels=labels, test_only=True)


def test_variant_classes_map_to_the_source_rows_of_their_imagenet_labels() -> None:
    source_labels = [5, 3, 9, 1]  # the source's class list need not be in label order
    assert subset_rows(source_labels, variant([1, 9])) == [3, 2]
    assert subset_rows(None, variant([7, 0])) == [7, 0]  # no list: the 1000 ImageNet classes in order


def test_unmatched_variants_are_refused_naming_the_classes() -> None:
    not_among = r"'class 1' \(ImageNet label 4\) are not among the 4 ImageNet classes"
    with pytest.raises(StageError, match=not_among):
        subset_rows([5, 3, 9, 1], variant([1, 4]))
    with pytest.raises(StageError, match="ImageNetA has no ImageNet label map"):
        subset_rows([5, 3, 9, 1], variant(None))


def test_a_missing_sweep_says_to_run_it_first(tmp_path: Path) -> None:
    params = params_from_dict({"sweep": {"results_dir": str(tmp_path / "sweep")}})
    with pytest.raises(StageError, match=r"trials.csv is missing; run the sweep first \(dvc repro sweep\)"):
        run_domain_shift(params, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
