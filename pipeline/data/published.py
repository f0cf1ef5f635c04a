"""The papers' published numbers (published.json, with sources) the report and the cost model compare with."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PUBLISHED_FILE = Path(__file__).with_name("published.json")


def load_published() -> dict[str, Any]:
    """published.json: CoOp's 16-shot and zero-shot accuracies, the official training time, CoCoOp's and KgCoOp's
    base-to-new and cross-dataset tables, with sources."""
    return json.loads(PUBLISHED_FILE.read_text(encoding="utf-8"))


@dataclass(frozen=True)
class BaseNew:
    """One published base-to-new cell: base and new accuracy (%) and their harmonic mean H as printed."""

    base: float
    new: float
    h: float


@dataclass(frozen=True)
class PublishedBaseToNew:
    """One method's row of the published base-to-new table (published.json's base_to_new.methods)."""

    name: str  # as the papers name it: CLIP, CoOp, CoCoOp, KgCoOp
    method: str  # the sweep's method id (coop, cocoop, kgcoop) or zero-shot
    text: str
    datasets: dict[str, BaseNew]  # empty where no per-dataset row was recorded
    average: BaseNew  # over the papers' 11 datasets
    source: str  # the block's source unless the method has its own


def base_to_new_rows(published: dict[str, Any]) -> list[PublishedBaseToNew]:
    """The base_to_new block's methods, in file order."""
    block = published["base_to_new"]
    return [PublishedBaseToNew(name, m["method"], m["text"],
                               {d: BaseNew(**v) for d, v in m["datasets"].items()}, BaseNew(**m["average"]),
                               m.get("source", block["source"]))
            for name, m in block["methods"].items()]


@dataclass(frozen=True)
class PublishedTransfer:
    """One method's row of the published cross-dataset table (published.json's cross_dataset.methods)."""

    name: str
    method: str
    source_accuracy: float
    targets: dict[str, float]
    average: float  # over the targets


def cross_dataset_rows(published: dict[str, Any]) -> list[PublishedTransfer]:
    """The cross_dataset block's methods, in file order."""
    return [PublishedTransfer(name, m["method"], m["source_accuracy"], dict(m["targets"]), m["average"])
            for name, m in published["cross_dataset"]["methods"].items()]
