"""Base-to-new class splits against a transcription of the official rule (CoOp repository, CoCoOp's
datasets/oxford_pets.py `subsample_classes`, read 2026-11-30): labels of the first argument (train) sorted,
m = ceil(n / 2), base = labels[:m], new = labels[m:], each relabelled by enumerate order, applied to every split."""

from __future__ import annotations

import math

import pytest

from pipeline.data.datasets import DatasetError, DatasetSplits, Item
from pipeline.data.protocols import base_new_labels, subsample_classes


def official(train: list[Item], *others: list[Item], subsample: str) -> list[list[Item]]:
    """The transcription: a plain loop, as the official function reads."""
    labels = sorted({item.label for item in train})
    m = math.ceil(len(labels) / 2)
    selected = labels[:m] if subsample == "base" else labels[m:]
    relabeler = {y: y_new for y_new, y in enumerate(selected)}
    out = []
    for dataset in (train, *others):
        out.append([Item(i.path, relabeler[i.label], i.classname) for i in dataset if i.label in selected])
    return out


def splits(n_classes: int, labels_order: list[int] | None = None) -> DatasetSplits:
    names = [f"class {c}" for c in range(n_classes)]
    order = labels_order or list(range(n_classes))
    items = {s: [Item(f"{s}/{c}_{i}.png", c, names[c]) for c in order for i in range(2)] for s in ("train", "val", "test")}
    return DatasetSplits("Toy", names, items["train"], items["val"], items["test"])


@pytest.mark.parametrize("n", [2, 3, 7, 10, 37, 100])
@pytest.mark.parametrize("subsample", ["base", "new"])
def test_base_and_new_follow_the_official_rule(n: int, subsample: str) -> None:
    data = splits(n, labels_order=list(range(n))[::-1])  # label order of appearance must not matter
    got = subsample_classes(data, subsample)
    expected = official(data.train, data.val, data.test, subsample=subsample)
    assert [got.train, got.val, got.test] == expected
    base, new = base_new_labels(range(n))
    kept = base if subsample == "base" else new
    assert got.classnames == [f"class {c}" for c in kept]
    assert all(got.classnames[i.label] == i.classname for i in got.train + got.test)
    assert len(base) == math.ceil(n / 2) and len(base) + len(new) == n


def test_all_is_unchanged_and_bad_input_is_named() -> None:
    data = splits(4)
    assert subsample_classes(data, "all") is data
    with pytest.raises(DatasetError, match="unknown class subsample 'half'; choose from all, base, new"):
        subsample_classes(data, "half")
    with pytest.raises(DatasetError, match="at least 2 classes"):
        subsample_classes(splits(1), "base")
