"""Draw CoOp few-shot train/val splits exactly as the official CoOp/Dassl code does, and store them as JSON.

The official rule (Dassl ``DatasetBase.generate_fewshot_dataset`` in today's Dassl, 0.6.3 at commit c61a1b5,
which CoOp's README tells users to install from source; called by every CoOp dataset after ``random.seed(seed)``): group the items by label in
order of first appearance, then for each label take ``random.sample(items, K)``; a label with fewer than K
items keeps all of them, in order, and draws no random numbers (Dassl's default ``repeat=False`` since
October 2021). ``repeat=True`` reproduces older runs: such a label gets ``random.choices(items, k=K)``, drawn
with replacement. The train list is drawn first with K shots, then the val list with ``min(K, 4)`` shots,
from the same random stream. K < 1 keeps every item. The random stream is a private ``random.Random(seed)``, which yields the same numbers as the
official global ``random.seed(seed)`` without touching global state.

Files: ``<splits dir>/<dataset>/shot<K>_seed<S>.json`` per shots x seed (``shotall`` for K < 1) and one
``<splits dir>/<dataset>/test.json`` with the dataset's test list and class names.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.atomic import write_text_atomic
from pipeline.data.datasets import DatasetError, DatasetSplits, Item, dataset_folder, resolve_name

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MAX_VAL_SHOTS = 4


@dataclass
class FewShotSplit:
    """One few-shot draw of a dataset: K-shot train list and min(K, 4)-shot val list."""

    dataset: str
    shots: int
    seed: int
    classnames: list[str]
    train: list[Item]
    val: list[Item]
    val_is_test: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "dataset": self.dataset,
            "shots": self.shots,
            "seed": self.seed,
            "classnames": self.classnames,
            "val_is_test": self.val_is_test,
            "train": [item.to_json() for item in self.train],
            "val": [item.to_json() for item in self.val],
        }


@dataclass
class EvalList:
    """A dataset's full test list plus what evaluation needs (class names, template, ImageNet label map)."""

    dataset: str
    classnames: list[str]
    template: str
    test: list[Item]
    imagenet_labels: list[int] | None = None
    test_only: bool = False  # no few-shot splits exist (ImageNet variants)

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "dataset": self.dataset,
            "classnames": self.classnames,
            "template": self.template,
            "imagenet_labels": self.imagenet_labels,
            "test_only": self.test_only,
            "test": [item.to_json() for item in self.test],
        }


def normalize_shots(shots: int) -> int:
    """K < 1 means 'all images'; stored as -1."""
    return shots if shots >= 1 else -1


def split_by_label(items: Sequence[Item]) -> dict[int, list[Item]]:
    """Items grouped by label, labels in order of first appearance (Dassl's defaultdict order)."""
    groups: dict[int, list[Item]] = {}
    for item in items:
        groups.setdefault(item.label, []).append(item)
    return groups


def sample_fewshot(items: Sequence[Item], shots: int, rng: random.Random, repeat: bool = False) -> list[Item]:
    """Dassl's generate_fewshot_dataset for one data source, drawing from `rng`.

    A label with fewer than `shots` items keeps them all (``repeat=False``, Dassl's default) or is drawn
    with replacement up to `shots` (``repeat=True``, the rule before Dassl's October 2021 change).
    """
    if shots < 1:
        return list(items)
    output: list[Item] = []
    for group in split_by_label(items).values():
        if len(group) >= shots:
            output.extend(rng.sample(group, shots))
        elif repeat:
            output.extend(rng.choices(group, k=shots))
        else:
            output.extend(group)
    return output


def make_fewshot_split(splits: DatasetSplits, shots: int, seed: int, repeat: bool = False) -> FewShotSplit:
    """The K-shot split that official CoOp draws for `splits` with random seed `seed` (see `sample_fewshot`)."""
    if splits.test_only:
        raise DatasetError(
            f"{splits.name} is a test-only dataset (CoOp evaluates ImageNet-trained contexts on it); "
            "it has no train images to draw few-shot splits from."
        )
    shots = normalize_shots(shots)
    rng = random.Random(seed)
    train = sample_fewshot(splits.train, shots, rng, repeat)
    val = sample_fewshot(splits.val, min(shots, MAX_VAL_SHOTS) if shots >= 1 else -1, rng, repeat)
    return FewShotSplit(splits.name, shots, seed, list(splits.classnames), train, val, splits.val_is_test)


def make_eval_list(splits: DatasetSplits) -> EvalList:
    return EvalList(
        splits.name,
        list(splits.classnames),
        splits.template,
        list(splits.test),
        splits.imagenet_labels,
        splits.test_only,
    )


# ------------------------------------------------------------------------------------------------ files


def split_filename(shots: int, seed: int) -> str:
    shots = normalize_shots(shots)
    return f"shot{'all' if shots < 1 else shots}_seed{seed}.json"


def split_path(splits_dir: Path | str, dataset: str, shots: int, seed: int) -> Path:
    return Path(splits_dir) / dataset / split_filename(shots, seed)


def eval_list_path(splits_dir: Path | str, dataset: str) -> Path:
    return Path(splits_dir) / dataset / "test.json"


def is_test_only(splits_dir: Path | str, dataset: str) -> bool:
    """True for a dataset without few-shot splits (a shifted test set such as ImageNet-V2): as the prepare
    stage's test list records it, or, before prepare has run, as the dataset registry says."""
    path = eval_list_path(splits_dir, dataset_folder(dataset))
    if path.exists():
        return read_eval_list(path).test_only
    info = resolve_name(dataset)
    return info is not None and info.test_only


def _write_compact_json(data: Any, path: Path) -> None:
    # Compact: ImageNet-size split files are written and read many times.
    write_text_atomic(path, json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n")


def write_fewshot_split(split: FewShotSplit, path: Path | str) -> None:
    _write_compact_json(split.to_json(), Path(path))


def write_eval_list(test: EvalList, path: Path | str) -> None:
    _write_compact_json(test.to_json(), Path(path))


def write_dataset_splits(splits: DatasetSplits, splits_dir: Path | str, shots: Sequence[int], seeds: Sequence[int],
                         repeat: bool = False) -> list[tuple[int, int, FewShotSplit]]:
    """What the prepare stage writes for one dataset: its test list and, unless it is test-only, the K-shot split
    of every shots x seed. Returns the few-shot splits written, as (shots, seed, split)."""
    write_eval_list(make_eval_list(splits), eval_list_path(splits_dir, splits.name))
    written = []
    if not splits.test_only:
        for k in shots:
            for seed in seeds:
                split = make_fewshot_split(splits, k, seed, repeat)
                write_fewshot_split(split, split_path(splits_dir, splits.name, k, seed))
                written.append((k, seed, split))
    return written


def _load_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(
            f"{what} {path} does not exist; run the prepare stage first (`dvc repro prepare` or "
            "`python -m stages.prepare --help`)."
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetError(f"{what} {path} is not valid JSON ({error}); rerun the prepare stage.") from None
    if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
        raise DatasetError(
            f"{what} {path} has format_version {data.get('format_version') if isinstance(data, dict) else None}, "
            f"expected {FORMAT_VERSION}; rerun the prepare stage."
        )
    return data


def _items(entries: Any, where: str, n_classes: int) -> list[Item]:
    """Rows [path, label, classname] with labels in 0..n_classes-1; DatasetError names the bad row."""
    if not isinstance(entries, list):
        raise DatasetError(f"{where} must be a list of [path, label, classname]; rerun the prepare stage.")
    out = []
    for i, entry in enumerate(entries):
        if not (
            isinstance(entry, list)
            and len(entry) == 3
            and isinstance(entry[0], str)
            and isinstance(entry[1], int)
            and not isinstance(entry[1], bool)
            and isinstance(entry[2], str)
        ):
            raise DatasetError(f"{where}[{i}] must be [path, label, classname], got {entry!r}; rerun the prepare stage.")
        if not 0 <= entry[1] < n_classes:
            raise DatasetError(f"{where}[{i}] has label {entry[1]}, outside the file's {n_classes} classes "
                               f"(0..{n_classes - 1}); rerun the prepare stage.")
        out.append(Item(entry[0], entry[1], entry[2]))
    return out


def _classnames(data: dict[str, Any], where: str) -> list[str]:
    names = data["classnames"]
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise DatasetError(f"{where}: classnames must be a non-empty list of names, got {names!r}; "
                           "rerun the prepare stage.")
    return names


def read_fewshot_split(path: Path | str) -> FewShotSplit:
    path = Path(path)
    data = _load_json(path, "Few-shot split file")
    where = f"Few-shot split file {path}"
    try:
        fields = {name: data[name] for name in ("dataset", "shots", "seed", "classnames", "train", "val")}
    except KeyError as error:
        raise DatasetError(f"{where} lacks the field {error}; rerun the prepare stage.") from None
    try:
        shots, seed = int(fields["shots"]), int(fields["seed"])
    except (TypeError, ValueError) as error:
        raise DatasetError(f"{where} has a malformed shots or seed ({error}); rerun the prepare stage.") from None
    classnames = _classnames(data, where)
    return FewShotSplit(
        dataset=str(fields["dataset"]),
        shots=shots,
        seed=seed,
        classnames=classnames,
        train=_items(fields["train"], f"{where}: train", len(classnames)),
        val=_items(fields["val"], f"{where}: val", len(classnames)),
        val_is_test=bool(data.get("val_is_test", False)),
    )


def read_eval_list(path: Path | str) -> EvalList:
    path = Path(path)
    data = _load_json(path, "Test list file")
    where = f"Test list file {path}"
    try:
        classnames = _classnames(data, where)
        return EvalList(
            dataset=str(data["dataset"]),
            classnames=classnames,
            template=str(data["template"]),
            test=_items(data["test"], f"{where}: test", len(classnames)),
            imagenet_labels=data.get("imagenet_labels"),
            test_only=bool(data.get("test_only", False)),
        )
    except KeyError as error:
        raise DatasetError(f"{where} lacks the field {error}; rerun the prepare stage.") from None
