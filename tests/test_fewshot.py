"""Few-shot splits: identical to the official CoOp/Dassl draw, stored and read back as JSON."""

from __future__ import annotations

import json
import random
from collections import defaultdict
from pathlib import Path

import pytest
from fixtures_data import build_imagenet_r

from pipeline.data.datasets import DatasetError, DatasetSplits, Item, load_dataset
from pipeline.data.demo import demo_root
from pipeline.data.fewshot import (
    make_fewshot_split,
    read_fewshot_split,
    split_path,
    write_fewshot_split,
)


def official_generate_fewshot(data_source: list, num_shots: int, repeat: bool = False) -> list:
    """Transcription of Dassl's DatasetBase.generate_fewshot_dataset for one data source.

    Transcribed from Dassl.pytorch 0.6.3 (dassl/data/datasets/base_dataset.py at commit c61a1b5, 2022-10-06,
    the repository's head, which CoOp's README has users install from source): `repeat` defaults to False
    since commit e3a15da (2021-10-09); runs made before then drew with `repeat=True`.
    """
    if num_shots < 1:
        return data_source
    tracker = defaultdict(list)
    for item in data_source:
        tracker[item.label].append(item)
    dataset = []
    for _label, items in tracker.items():
        if len(items) >= num_shots:
            sampled_items = random.sample(items, num_shots)
        elif repeat:
            sampled_items = random.choices(items, k=num_shots)
        else:
            sampled_items = items
        dataset.extend(sampled_items)
    return dataset


def official_coop(train: list, val: list, num_shots: int, seed: int, repeat: bool = False) -> tuple[list, list]:
    """What CoOp's train.py + dataset class do: set_random_seed(seed), then draw train, then val."""
    random.seed(seed)
    train = official_generate_fewshot(train, num_shots=num_shots, repeat=repeat)
    val = official_generate_fewshot(val, num_shots=min(num_shots, 4), repeat=repeat)
    return train, val


def synthetic(n_classes: int = 7, rng_seed: int = 5) -> DatasetSplits:
    """Uneven classes (some smaller than K), labels first appearing out of numeric order."""
    rng = random.Random(rng_seed)
    items = {s: [] for s in ("train", "val", "test")}
    for split, base in (("train", 3), ("val", 1), ("test", 2)):
        for label in range(n_classes):
            for n in range(base + (label * 3) % 11):
                items[split].append(Item(f"d/{split}/{label}/{n}.jpg", label, f"class {label}"))
        rng.shuffle(items[split])
    names = [f"class {i}" for i in range(n_classes)]
    return DatasetSplits("Synthetic", names, items["train"], items["val"], items["test"])


@pytest.mark.parametrize("repeat", [False, True])
@pytest.mark.parametrize("shots", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_matches_official_rule_on_synthetic(shots: int, seed: int, repeat: bool) -> None:
    splits = synthetic()
    sizes = defaultdict(int)
    for item in splits.train:
        sizes[item.label] += 1
    if shots >= 4:  # the train draw covers labels with at least and with fewer than K items
        assert min(sizes.values()) < shots
    ours = make_fewshot_split(splits, shots, seed, repeat=repeat)
    train, val = official_coop(splits.train, splits.val, shots, seed, repeat=repeat)
    assert ours.train == train
    assert ours.val == val


@pytest.mark.parametrize("shots", [1, 4, 16])
def test_matches_official_rule_on_demo(shots: int) -> None:
    splits = load_dataset("FashionMNIST", demo_root())
    for seed in (1, 2, 3):
        ours = make_fewshot_split(splits, shots, seed)
        train, val = official_coop(splits.train, splits.val, shots, seed)
        assert ours.train == train and ours.val == val


def test_counts_repeats_and_all() -> None:
    splits = synthetic()
    by_label = defaultdict(list)
    for item in splits.train:
        by_label[item.label].append(item)
    small = [lab for lab, items in by_label.items() if len(items) < 8]
    assert small, "the synthetic set must have classes smaller than K"
    # Today's rule (repeat=False): a class with fewer than K images keeps all of them, in order.
    split = make_fewshot_split(splits, 8, 1)
    per_label = defaultdict(list)
    for item in split.train:
        per_label[item.label].append(item)
    assert len(per_label) == 7
    assert all(per_label[lab] == by_label[lab] for lab in small)
    assert all(len(set(v)) == 8 for lab, v in per_label.items() if lab not in small)
    # repeat=True: such classes are drawn with replacement up to K (the pre-October-2021 rule).
    split = make_fewshot_split(splits, 8, 1, repeat=True)
    per_label = defaultdict(list)
    for item in split.train:
        per_label[item.label].append(item)
    assert all(len(v) == 8 for v in per_label.values()) and len(per_label) == 7
    assert any(len(set(per_label[lab])) < 8 for lab in small)
    assert all(len(set(v)) == 8 for lab, v in per_label.items() if lab not in small)
    val_counts = defaultdict(int)
    for item in split.val:
        val_counts[item.label] += 1
    assert set(val_counts.values()) == {4}
    for k in (0, -1):
        everything = make_fewshot_split(splits, k, 1)
        assert everything.train == splits.train and everything.val == splits.val and everything.shots == -1


def test_small_labels_draw_no_random_numbers() -> None:
    """A label kept whole consumes no draws: the next label's sample equals the one drawn without it."""
    big = [Item(f"b/{i}.jpg", 1, "big") for i in range(10)]
    small = [Item(f"s/{i}.jpg", 0, "small") for i in range(2)]
    with_small = make_fewshot_split(DatasetSplits("X", ["small", "big"], small + big, [], []), 4, 3)
    alone = make_fewshot_split(DatasetSplits("X", ["small", "big"], big, [], []), 4, 3)
    assert with_small.train[:2] == small
    assert with_small.train[2:] == alone.train


def test_seeds_differ_and_global_random_untouched() -> None:
    splits = synthetic()
    random.seed(123)
    state = random.getstate()
    a, b = make_fewshot_split(splits, 2, 1), make_fewshot_split(splits, 2, 2)
    assert random.getstate() == state
    assert a.train != b.train
    assert make_fewshot_split(splits, 2, 1).train == a.train


def test_test_only_dataset_has_no_fewshot(tmp_path: Path) -> None:
    build_imagenet_r(tmp_path)
    with pytest.raises(DatasetError, match="ImageNetR is a test-only dataset"):
        make_fewshot_split(load_dataset("ImageNetR", tmp_path), 4, 1)


def test_json_round_trip(tmp_path: Path) -> None:
    split = make_fewshot_split(synthetic(), 4, 2)
    path = split_path(tmp_path, "Synthetic", 4, 2)
    assert path == tmp_path / "Synthetic" / "shot4_seed2.json"
    write_fewshot_split(split, path)
    assert read_fewshot_split(path) == split
    data = json.loads(path.read_text())
    assert data["dataset"] == "Synthetic" and data["shots"] == 4 and data["seed"] == 2
    assert data["train"][0] == [split.train[0].path, split.train[0].label, split.train[0].classname]
    assert [p.name for p in path.parent.iterdir()] == ["shot4_seed2.json"]  # no temp file left behind
    assert split_path(tmp_path, "X", -1, 1).name == "shotall_seed1.json"


def test_reading_missing_or_foreign_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="run the prepare stage first"):
        read_fewshot_split(tmp_path / "nope.json")
    (tmp_path / "old.json").write_text(json.dumps({"format_version": 0}))
    with pytest.raises(DatasetError, match="format_version 0, expected 1"):
        read_fewshot_split(tmp_path / "old.json")
