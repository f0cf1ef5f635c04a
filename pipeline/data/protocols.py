"""The evaluation protocols (few-shot, base-to-new, cross-dataset) and base-to-new's class split (CoCoOp's rule)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from pipeline.data.datasets import DatasetError, DatasetSplits, Item

SUBSAMPLES = ("all", "base", "new")

# The sweep's evaluation protocols (sweep.space.protocol): few-shot on all classes; base-to-new
# generalisation (train on the base half, test on base and on new); cross-dataset transfer (train on all
# classes, test on other datasets too: transfer.targets).
FEWSHOT, BASE2NEW, XD = "fewshot", "base2new", "xd"
PROTOCOLS = (FEWSHOT, BASE2NEW, XD)


def harmonic_mean(base: float, new: float) -> float:
    """Base-to-new's H = 2·base·new / (base + new) (CoCoOp's trade-off); 0 when both are 0, NaN without both."""
    if not (math.isfinite(base) and math.isfinite(new)):
        return math.nan
    return 2 * base * new / (base + new) if base + new > 0 else 0.0


def base_new_labels(labels: Sequence[int]) -> tuple[list[int], list[int]]:
    """The official rule: the distinct labels sorted, the first ceil(n / 2) are base, the rest new."""
    distinct = sorted(set(labels))
    if len(distinct) < 2:
        raise DatasetError(f"base-to-new needs at least 2 classes to split, got {len(distinct)}")
    half = math.ceil(len(distinct) / 2)
    return distinct[:half], distinct[half:]


def subsample_classes(splits: DatasetSplits, subsample: str) -> DatasetSplits:
    """`splits` restricted to its base or new classes, each relabelled from 0 in label order ("all": unchanged).

    The classes are split on the training labels (as the official code reads them from its first argument);
    val and test keep the same classes. The class names follow their labels.
    """
    if subsample not in SUBSAMPLES:
        raise DatasetError(f"unknown class subsample {subsample!r}; choose from {', '.join(SUBSAMPLES)}")
    if subsample == "all":
        return splits
    base, new = base_new_labels([item.label for item in splits.train])
    kept = base if subsample == "base" else new
    relabel = {old: new_label for new_label, old in enumerate(kept)}

    def keep(items: list[Item]) -> list[Item]:
        return [Item(item.path, relabel[item.label], item.classname) for item in items if item.label in relabel]

    return dataclasses.replace(
        splits,
        classnames=[splits.classnames[old] for old in kept],
        train=keep(splits.train),
        val=keep(splits.val),
        test=keep(splits.test),
        imagenet_labels=[splits.imagenet_labels[old] for old in kept] if splits.imagenet_labels else None,
    )
