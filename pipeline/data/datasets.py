"""Read the 11 CoOp datasets, the 4 ImageNet variants and user datasets into train/val/test item lists.

Every reader follows the folder layout of the official CoOp repository's DATASETS.md under one data root
and reproduces the official label and class-name assignment, so few-shot splits drawn from these lists
match the published ones. Paths in the returned items are relative to the data root (POSIX), which keeps
split files and feature caches valid when the data root moves.

Deviations from the official code, on purpose:

* Image names inside class folders (ImageNet and its variants) are sorted; the official code takes
  ``os.listdir`` order, which depends on the filesystem and so is not reproducible anyway.
* ImageNet has no validation split. Like the official code we use the ImageNet val folder as the test set
  and also as the validation list (``val = test``); `DatasetSplits.val_is_test` flags this so a sweep can
  tell that selecting hyperparameters on it touches the test images.
* The test-only ImageNet variants (V2, Sketch, A, R) have empty train/val lists; the official code sets
  ``train = test`` only because its framework needs a non-empty train list.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

from pipeline.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_TEMPLATE = "a photo of a {}."
SPLIT_NAMES = ("train", "val", "test")


class DatasetError(UserError, ValueError):
    """A dataset folder, split file or class list is missing or malformed."""


@dataclass(frozen=True)
class Item:
    """One labelled image. `path` is relative to the data root, POSIX style."""

    path: str
    label: int
    classname: str

    def to_json(self) -> list:
        return [self.path, self.label, self.classname]


@dataclass
class DatasetSplits:
    """All images of one dataset, by split, with the class list (index = label)."""

    name: str
    classnames: list[str]
    train: list[Item]
    val: list[Item]
    test: list[Item]
    template: str = DEFAULT_TEMPLATE
    # Label of each class in the 1000-class ImageNet label space (ImageNet variants only), so contexts
    # learned on ImageNet can be evaluated on the 200-class subsets ImageNet-A and ImageNet-R.
    imagenet_labels: list[int] | None = None
    val_is_test: bool = False
    test_only: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.classnames)


@dataclass(frozen=True)
class DatasetInfo:
    """Where a registered dataset lives under the data root and how to read it."""

    name: str
    folder: str  # dataset folder under the data root
    image_dir: str  # image folder, relative to the dataset folder ("" = the dataset folder itself)
    reader: str  # one of _READERS
    split_file: str | None = None  # relative to the dataset folder
    template: str = DEFAULT_TEMPLATE
    test_only: bool = False
    layout: str = ""  # expected layout, shown when something is missing
    aliases: tuple[str, ...] = field(default_factory=tuple)


def _split_layout(folder: str, image_dir: str, split_file: str, extra: str = "") -> str:
    images = f"{folder}/{image_dir}/" if image_dir else f"{folder}/"
    return (
        f"<data root>/{folder}/\n"
        f'    {split_file}   (JSON: {{"train"|"val"|"test": [[relative_path, label, classname], ...]}})\n'
        f"    {images}...     (paths in the split file are relative to <data root>/{images})" + extra
    )


_IMAGENET_FOLDER_LAYOUT = (
    "<data root>/{folder}/\n    classnames.txt   (lines 'n01440764 tench': wnid, space, class name)\n"
    "    {image_dir}/<wnid>/<image files>"
)

# The generated world's tasks (pipeline/data/synthetic/tasks.py, written by `python -m stages.world` into
# data/world) in the generic layout: name -> (hand-crafted prompt, test-only). The shifted sets of WorldSketch
# share its classes and prompt. CoOp's "a photo of a {}." is the prompt wherever the class name is a noun:
# "a drawing of a {}.", "a {}." and "... {} shape." were measured within 1.5 points of it on every task.
WORLD_TASKS: dict[str, tuple[str, bool]] = {
    "WorldShape": ("a photo of a {}.", False),
    "WorldSketch": ("a photo of a {}.", False),
    "WorldPastel": ("a photo of a {}.", False),
    "WorldPastelRare": ("a photo of a {} shape.", False),
    **{f"WorldSketch{shift}": ("a photo of a {}.", True) for shift in ("V2", "Backgrounds", "Pastel", "Large")},
}

DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in [
        DatasetInfo(
            "ImageNet",
            "imagenet",
            "images",
            "imagenet",
            layout="<data root>/imagenet/\n    classnames.txt   (lines 'n01440764 tench')\n"
            "    images/train/<wnid>/<image files>\n    images/val/<wnid>/<image files>",
        ),
        DatasetInfo(
            "Caltech101",
            "caltech-101",
            "101_ObjectCategories",
            "split",
            "split_zhou_Caltech101.json",
        ),
        DatasetInfo(
            "OxfordPets",
            "oxford_pets",
            "images",
            "split",
            "split_zhou_OxfordPets.json",
            template="a photo of a {}, a type of pet.",
        ),
        DatasetInfo("StanfordCars", "stanford_cars", "", "split", "split_zhou_StanfordCars.json"),
        DatasetInfo(
            "OxfordFlowers",
            "oxford_flowers",
            "jpg",
            "split",
            "split_zhou_OxfordFlowers.json",
            template="a photo of a {}, a type of flower.",
            aliases=("Flowers102",),
        ),
        DatasetInfo(
            "Food101",
            "food-101",
            "images",
            "split",
            "split_zhou_Food101.json",
            template="a photo of {}, a type of food.",
        ),
        DatasetInfo(
            "FGVCAircraft",
            "fgvc_aircraft",
            "images",
            "aircraft",
            template="a photo of a {}, a type of aircraft.",
            layout="<data root>/fgvc_aircraft/\n    variants.txt   (one variant name a line; label = line index)\n"
            "    images_variant_{train,val,test}.txt   (lines '<imagename> <variant name>')\n"
            "    images/<imagename>.jpg",
        ),
        DatasetInfo("SUN397", "sun397", "SUN397", "split", "split_zhou_SUN397.json"),
        DatasetInfo(
            "DTD",
            "dtd",
            "images",
            "split",
            "split_zhou_DescribableTextures.json",
            template="{} texture.",
        ),
        DatasetInfo(
            "EuroSAT",
            "eurosat",
            "2750",
            "split",
            "split_zhou_EuroSAT.json",
            template="a centered satellite photo of {}.",
        ),
        DatasetInfo(
            "UCF101",
            "ucf101",
            "UCF-101-midframes",
            "split",
            "split_zhou_UCF101.json",
            template="a photo of a person doing {}.",
        ),
        DatasetInfo(
            "ImageNetV2",
            "imagenetv2",
            "imagenetv2-matched-frequency-format-val",
            "imagenetv2",
            test_only=True,
            layout="<data root>/imagenetv2/\n    classnames.txt   (the 1000 ImageNet classes, wnid order)\n"
            "    imagenetv2-matched-frequency-format-val/<label 0..999>/<image files>",
        ),
        DatasetInfo(
            "ImageNetSketch",
            "imagenet-sketch",
            "images",
            "imagenet_folder",
            test_only=True,
            layout=_IMAGENET_FOLDER_LAYOUT.format(folder="imagenet-sketch", image_dir="images"),
        ),
        DatasetInfo(
            "ImageNetA",
            "imagenet-adversarial",
            "imagenet-a",
            "imagenet_folder",
            test_only=True,
            layout=_IMAGENET_FOLDER_LAYOUT.format(folder="imagenet-adversarial", image_dir="imagenet-a"),
        ),
        DatasetInfo(
            "ImageNetR",
            "imagenet-rendition",
            "imagenet-r",
            "imagenet_folder",
            test_only=True,
            layout=_IMAGENET_FOLDER_LAYOUT.format(folder="imagenet-rendition", image_dir="imagenet-r"),
        ),
        DatasetInfo(
            "FashionMNIST",
            "fashion_mnist",
            "images",
            "split",
            "split_zhou_FashionMNIST.json",
        ),
        *(
            DatasetInfo(name, name, "images", "split", f"split_{name}.json", template=template, test_only=test_only)
            for name, (template, test_only) in WORLD_TASKS.items()
        ),
    ]
}

GENERIC_LAYOUT = (
    "<data root>/<name>/\n"
    '    split_zhou_<Name>.json   (JSON: {"train"|"val"|"test": [[relative_path, label, classname], ...]},\n'
    '                              optional "template": "a photo of a {}.", optional "test_only": true\n'
    '                              for a test set alone: empty train and val)\n'
    "    images/...               (paths in the split file are relative to <data root>/<name>/images/)"
)


def known_datasets() -> list[str]:
    """Registered dataset names (aliases not included)."""
    return list(DATASETS)


def resolve_name(name: str) -> DatasetInfo | None:
    """The registry entry for `name` (case-insensitive; aliases and folder names accepted), or None."""
    wanted = name.strip().lower()
    for info in DATASETS.values():
        if wanted in {info.name.lower(), info.folder.lower(), *(a.lower() for a in info.aliases)}:
            return info
    return None


def dataset_folder(name: str) -> str:
    """The folder stages.prepare writes a dataset's splits and cache under (its canonical registry name)."""
    info = resolve_name(name)
    return info.name if info is not None else name


def get_info(name: str, root: Path | None = None) -> DatasetInfo:
    """Registry entry for `name`, or a generic entry when `<root>/<name>/` holds one ``split_*.json``."""
    info = resolve_name(name)
    if info is not None:
        return info
    if root is not None:
        folder = Path(root) / name
        if folder.is_dir():
            candidates = sorted(folder.glob("split_*.json"))
            if len(candidates) == 1:
                return DatasetInfo(
                    name,
                    name,
                    "images",
                    "split",
                    candidates[0].name,
                    layout=GENERIC_LAYOUT.replace("<name>", name),
                )
            if len(candidates) > 1:
                raise DatasetError(
                    f"Dataset folder {folder} holds several split files "
                    f"({', '.join(c.name for c in candidates)}); keep exactly one split_*.json there."
                )
    raise DatasetError(
        f"Unknown dataset {name!r}. Known datasets: {', '.join(known_datasets())} "
        f"(alias: Flowers102). To add your own, create this layout and pass the folder name:\n{GENERIC_LAYOUT}"
    )


def load_dataset(name: str, root: Path | str, check_files: bool = True) -> DatasetSplits:
    """Read dataset `name` from data root `root`.

    `check_files` verifies that every listed image exists (the official code does the same); turn it off
    only when the image files are known to be present and the listing must be fast.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(
            f"Data root {root} does not exist or is not a folder; pass the folder holding the datasets."
        )
    info = get_info(name, root)
    dataset_dir = root / info.folder
    if not dataset_dir.is_dir():
        raise DatasetError(_missing(dataset_dir, info))
    splits = _READERS[info.reader](root, info)
    _check_labels(splits, info)
    if check_files:
        _check_files_exist(root, splits)
    log.info(
        "%s: %d classes, %d train / %d val / %d test images",
        splits.name,
        splits.num_classes,
        len(splits.train),
        len(splits.val),
        len(splits.test),
    )
    return splits


# --------------------------------------------------------------------------------------------- readers


def _missing(path: Path, info: DatasetInfo) -> str:
    layout = info.layout or _split_layout(info.folder, info.image_dir, info.split_file or "split.json")
    return f"{info.name}: {path} is missing. Expected layout:\n{layout}"


def _rel(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def _check_relative(path: str, where: str) -> str:
    if not isinstance(path, str) or not path:
        raise DatasetError(f"{where}: image path {path!r} must be a non-empty string.")
    posix = PurePosixPath(path.replace("\\", "/"))
    if posix.is_absolute() or PureWindowsPath(path).drive or PureWindowsPath(path).is_absolute():
        raise DatasetError(
            f"{where}: image path {path!r} is absolute; split files must hold paths relative to the image folder."
        )
    if ".." in posix.parts:
        raise DatasetError(
            f"{where}: image path {path!r} contains '..'; paths must stay inside the image folder."
        )
    return posix.as_posix()


def _read_split(root: Path, info: DatasetInfo) -> DatasetSplits:
    assert info.split_file is not None
    dataset_dir = root / info.folder
    split_path = dataset_dir / info.split_file
    image_dir = dataset_dir / info.image_dir if info.image_dir else dataset_dir
    if not split_path.is_file():
        raise DatasetError(_missing(split_path, info))
    if not image_dir.is_dir():
        raise DatasetError(_missing(image_dir, info))
    try:
        data = json.loads(split_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetError(
            f"{split_path} is not valid JSON ({error}); regenerate or fix the split file."
        ) from None
    if not isinstance(data, dict) or any(not isinstance(data.get(s), list) for s in SPLIT_NAMES):
        raise DatasetError(
            f"{split_path} must be a JSON object with lists 'train', 'val' and 'test' "
            f"(each entry [relative_path, label, classname])."
        )
    prefix = _rel(root, image_dir) if image_dir != root else ""
    lists: dict[str, list[Item]] = {}
    for split in SPLIT_NAMES:
        items = []
        for i, entry in enumerate(data[split]):
            where = f"{split_path} {split}[{i}]"
            if not (isinstance(entry, list) and len(entry) == 3):
                raise DatasetError(f"{where}: expected [relative_path, label, classname], got {entry!r}.")
            path, label, classname = entry
            rel = _check_relative(path, where)
            if isinstance(label, bool) or not isinstance(label, int) or not isinstance(classname, str):
                raise DatasetError(
                    f"{where}: label must be an integer and classname a string, got {entry!r}."
                )
            items.append(Item(f"{prefix}/{rel}" if prefix else rel, label, classname))
        lists[split] = items
    template = data.get("template", info.template)
    if not isinstance(template, str) or "{}" not in template:
        raise DatasetError(f"{split_path}: 'template' must be a string containing '{{}}', got {template!r}.")
    # A test-only set (e.g. a shifted test set of another dataset's classes) lists no train or val images.
    test_only = data.get("test_only", info.test_only)
    if not isinstance(test_only, bool):
        raise DatasetError(f"{split_path}: 'test_only' must be true or false, got {test_only!r}.")
    if test_only and (lists["train"] or lists["val"]):
        raise DatasetError(
            f"{split_path}: a test-only dataset lists no train or val images, found {len(lists['train'])} train "
            f"and {len(lists['val'])} val; empty those lists or drop 'test_only'."
        )
    return DatasetSplits(
        info.name, _classnames_from(lists.values()), lists["train"], lists["val"], lists["test"], template,
        test_only=test_only,
    )


def _classnames_from(lists: Iterable[list[Item]]) -> list[str]:
    mapping: dict[int, str] = {}
    for items in lists:
        for item in items:
            mapping.setdefault(item.label, item.classname)
    return [mapping[label] for label in sorted(mapping)]


def _read_classnames_txt(path: Path, info: DatasetInfo) -> dict[str, str]:
    """wnid -> class name, in file order (the official ImageNet.read_classnames)."""
    if not path.is_file():
        raise DatasetError(_missing(path, info))
    names: dict[str, str] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.strip().split(" ")
        if len(parts) < 2:
            raise DatasetError(f"{path}:{lineno}: expected '<wnid> <class name>', got {line!r}.")
        if parts[0] in names:
            raise DatasetError(f"{path}:{lineno}: wnid {parts[0]} is listed twice.")
        names[parts[0]] = " ".join(parts[1:])
    if not names:
        raise DatasetError(f"{path} lists no classes.")
    return names


def _list_images(folder: Path) -> list[Path]:
    return sorted(
        (Path(e.path) for e in os.scandir(folder) if e.is_file() and not e.name.startswith(".")),
        key=lambda p: p.name,
    )


def _class_folders(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _imagenet_label_map(classnames: dict[str, str]) -> dict[str, int]:
    # ImageNet labels are the wnid's rank among all 1000 sorted wnids (the official reader sorts folders).
    return {wnid: i for i, wnid in enumerate(sorted(classnames))}


def _read_wnid_folders(
    root: Path, folder: Path, classnames: dict[str, str], info: DatasetInfo
) -> tuple[list[str], list[Item]]:
    if not folder.is_dir():
        raise DatasetError(_missing(folder, info))
    wnids = _class_folders(folder)
    if not wnids:
        raise DatasetError(f"{info.name}: {folder} has no class folders. Expected layout:\n{info.layout}")
    unknown = [w for w in wnids if w not in classnames]
    if unknown:
        raise DatasetError(
            f"{info.name}: class folders {unknown[:5]} in {folder} are not listed in classnames.txt; "
            "use the classnames.txt from the CoOp repository (all 1000 ImageNet classes)."
        )
    items = [
        Item(_rel(root, path), label, classnames[wnid])
        for label, wnid in enumerate(wnids)
        for path in _list_images(folder / wnid)
    ]
    return wnids, items


def _read_imagenet(root: Path, info: DatasetInfo) -> DatasetSplits:
    dataset_dir = root / info.folder
    classnames = _read_classnames_txt(dataset_dir / "classnames.txt", info)
    image_dir = dataset_dir / info.image_dir
    wnids, train = _read_wnid_folders(root, image_dir / "train", classnames, info)
    val_wnids, test = _read_wnid_folders(root, image_dir / "val", classnames, info)
    if val_wnids != wnids:
        missing = sorted(set(wnids) ^ set(val_wnids))
        raise DatasetError(
            f"ImageNet: images/train and images/val must hold the same class folders (labels are folder "
            f"indices); these are in only one of them: {missing[:5]}."
        )
    label_map = _imagenet_label_map(classnames)
    return DatasetSplits(
        info.name,
        [classnames[w] for w in wnids],
        train,
        list(test),
        test,
        info.template,
        imagenet_labels=[label_map[w] for w in wnids],
        val_is_test=True,
    )


def _read_imagenet_folder(root: Path, info: DatasetInfo) -> DatasetSplits:
    dataset_dir = root / info.folder
    classnames = _read_classnames_txt(dataset_dir / "classnames.txt", info)
    wnids, test = _read_wnid_folders(root, dataset_dir / info.image_dir, classnames, info)
    label_map = _imagenet_label_map(classnames)
    return DatasetSplits(
        info.name,
        [classnames[w] for w in wnids],
        [],
        [],
        test,
        info.template,
        imagenet_labels=[label_map[w] for w in wnids],
        test_only=True,
    )


def _read_imagenetv2(root: Path, info: DatasetInfo) -> DatasetSplits:
    dataset_dir = root / info.folder
    classnames = _read_classnames_txt(dataset_dir / "classnames.txt", info)
    image_dir = dataset_dir / info.image_dir
    if not image_dir.is_dir():
        raise DatasetError(_missing(image_dir, info))
    wnids = list(classnames)
    test: list[Item] = []
    for label, wnid in enumerate(wnids):
        class_dir = image_dir / str(label)
        if not class_dir.is_dir():
            raise DatasetError(
                f"ImageNetV2: {class_dir} is missing; classnames.txt lists {len(wnids)} classes, so folders "
                f"0..{len(wnids) - 1} are expected. Expected layout:\n{info.layout}"
            )
        test.extend(Item(_rel(root, p), label, classnames[wnid]) for p in _list_images(class_dir))
    label_map = _imagenet_label_map(classnames)
    return DatasetSplits(
        info.name,
        [classnames[w] for w in wnids],
        [],
        [],
        test,
        info.template,
        imagenet_labels=[label_map[w] for w in wnids],
        test_only=True,
    )


def _read_aircraft(root: Path, info: DatasetInfo) -> DatasetSplits:
    dataset_dir = root / info.folder
    variants_path = dataset_dir / "variants.txt"
    if not variants_path.is_file():
        raise DatasetError(_missing(variants_path, info))
    classnames = [
        line.strip() for line in variants_path.read_text(encoding="utf-8").splitlines() if line.strip()
    ]
    if len(set(classnames)) != len(classnames):
        raise DatasetError(f"{variants_path} lists a variant more than once; each line must be unique.")
    label_of = {name: i for i, name in enumerate(classnames)}
    image_dir = dataset_dir / info.image_dir
    if not image_dir.is_dir():
        raise DatasetError(_missing(image_dir, info))
    lists: dict[str, list[Item]] = {}
    for split in SPLIT_NAMES:
        path = dataset_dir / f"images_variant_{split}.txt"
        if not path.is_file():
            raise DatasetError(_missing(path, info))
        items = []
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            parts = line.strip().split(" ")
            name = " ".join(parts[1:])
            if len(parts) < 2 or name not in label_of:
                raise DatasetError(
                    f"{path}:{lineno}: {line!r} does not name a variant from variants.txt "
                    "(expected '<imagename> <variant name>')."
                )
            rel = _check_relative(parts[0] + ".jpg", f"{path}:{lineno}")
            items.append(Item(_rel(root, image_dir / rel), label_of[name], name))
        lists[split] = items
    return DatasetSplits(info.name, classnames, lists["train"], lists["val"], lists["test"], info.template)


_READERS: dict[str, Callable[[Path, DatasetInfo], DatasetSplits]] = {
    "split": _read_split,
    "imagenet": _read_imagenet,
    "imagenet_folder": _read_imagenet_folder,
    "imagenetv2": _read_imagenetv2,
    "aircraft": _read_aircraft,
}


# ------------------------------------------------------------------------------------------ validation


def duplicate_classnames(names: Sequence[str]) -> dict[str, list[int]]:
    """Each name given to more than one label, with those labels in order (ImageNet: 'missile', 'sunglasses')."""
    labels: dict[str, list[int]] = {}
    for label, name in enumerate(names):
        labels.setdefault(name, []).append(label)
    return {name: found for name, found in labels.items() if len(found) > 1}


def _check_labels(splits: DatasetSplits, info: DatasetInfo) -> None:
    name_of: dict[int, tuple[str, str]] = {}
    for split in SPLIT_NAMES:
        for item in getattr(splits, split):
            seen = name_of.setdefault(item.label, (item.classname, split))
            if seen[0] != item.classname:
                raise DatasetError(
                    f"{info.name}: label {item.label} is called {seen[0]!r} in {seen[1]} but {item.classname!r} "
                    f"in {split} ({item.path}); each label must always have the same class name. Fix the split file."
                )
    if not name_of:
        raise DatasetError(f"{info.name}: no images listed in any split.")
    labels = sorted(name_of)
    if labels != list(range(len(labels))):
        gaps = sorted(set(range(max(labels[-1] + 1, 0))) - set(labels))
        raise DatasetError(
            f"{info.name}: labels must be 0..C-1 without gaps; found labels {labels[0]}..{labels[-1]} "
            f"with missing {gaps[:10]}{' ...' if len(gaps) > 10 else ''} (negative labels are not allowed)."
        )
    if len(splits.classnames) != len(labels):
        raise DatasetError(f"{info.name}: {len(splits.classnames)} class names for {len(labels)} labels.")
    shared = duplicate_classnames(splits.classnames)
    if shared:
        # Not an error: CLIP's ImageNet list (CoOp's classnames.txt) names two classes 'missile' and two
        # 'sunglasses'. Labels keep them apart; the prompt learner warns about what that means for prompts.
        log.info("%s: labels sharing a class name (kept as separate classes): %s", info.name,
                 "; ".join(f"{name!r} = {found}" for name, found in list(shared.items())[:10]))
    if not splits.test:
        raise DatasetError(f"{info.name}: the test split is empty.")
    if not splits.test_only and not splits.train:
        raise DatasetError(f"{info.name}: the train split is empty.")


def _check_files_exist(root: Path, splits: DatasetSplits) -> None:
    seen: set[str] = set()
    missing: list[str] = []
    for split in SPLIT_NAMES:
        for item in getattr(splits, split):
            if item.path in seen:
                continue
            seen.add(item.path)
            if not (root / item.path).is_file():
                missing.append(item.path)
    if missing:
        raise DatasetError(
            f"{splits.name}: {len(missing)} listed image(s) do not exist under the data root {root}, e.g. "
            f"{missing[:3]}. Check the data root and that the images were extracted where DATASETS.md says."
        )
