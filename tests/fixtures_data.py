"""Build miniature copies of the CoOp datasets in their official folder layouts, for the data tests.

Each builder writes tiny real images plus the dataset's split/class files under a data root and returns
what a correct reader must report (class names, per-split counts), computed independently of the reader.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

PathOf = Callable[[int, str, int], str]  # (label, split, n) -> image path relative to the image dir


@dataclass
class Expected:
    classnames: list[str]
    counts: dict[str, int]  # split -> number of items
    imagenet_labels: list[int] | None = None


def write_image(path: Path, seed: int, size: int = 12) -> None:
    """A small RGB image whose pixels depend on `seed`, so different files encode differently."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (size, size + seed % 5))
    image.putdata(
        [
            ((seed * 37 + i * 11) % 256, (seed * 91 + i * 7) % 256, (i * seed * 13) % 256)
            for i in range(size * (size + seed % 5))
        ]
    )
    image.save(path)


def _split_dataset(
    root: Path,
    folder: str,
    image_dir: str,
    split_file: str,
    classnames: list[str],
    per_class: tuple[int, int, int],
    path_of: PathOf,
) -> Expected:
    base = root / folder / image_dir if image_dir else root / folder
    split: dict[str, list] = {"train": [], "val": [], "test": []}
    seed = 0
    for split_name, n_per_class in zip(("train", "val", "test"), per_class, strict=True):
        for n in range(n_per_class):
            # Interleave classes like real split files do, so "order of first appearance" matters.
            for label, name in enumerate(classnames):
                rel = path_of(label, split_name, n)
                write_image(base / rel, seed)
                seed += 1
                split[split_name].append([rel, label, name])
    (root / folder).mkdir(parents=True, exist_ok=True)
    (root / folder / split_file).write_text(json.dumps(split), encoding="utf-8")
    counts = {s: n * len(classnames) for s, n in zip(("train", "val", "test"), per_class, strict=True)}
    return Expected(classnames, counts)


def _folder_path(classnames: list[str], ext: str = "jpg") -> PathOf:
    return lambda label, split, n: f"{classnames[label].replace(' ', '_')}/{split}_{n}.{ext}"


def build_caltech101(root: Path) -> Expected:
    names = ["accordion", "airplane", "anchor"]
    return _split_dataset(
        root,
        "caltech-101",
        "101_ObjectCategories",
        "split_zhou_Caltech101.json",
        names,
        (3, 2, 2),
        _folder_path(names),
    )


def build_oxford_pets(root: Path) -> Expected:
    names = ["abyssinian", "american_bulldog", "great_pyrenees"]
    return _split_dataset(
        root,
        "oxford_pets",
        "images",
        "split_zhou_OxfordPets.json",
        names,
        (4, 2, 2),
        lambda label, split, n: f"{names[label]}_{split}{n}.jpg",
    )


def build_stanford_cars(root: Path) -> Expected:
    names = ["2012 Tesla Model S", "1993 Volvo 240 Sedan", "2012 BMW M3 coupe"]
    return _split_dataset(
        root,
        "stanford_cars",
        "",
        "split_zhou_StanfordCars.json",
        names,
        (3, 1, 2),
        lambda label, split, n: (
            f"cars_{'test' if split == 'test' else 'train'}/{label:02d}{split}{n:03d}.jpg"
        ),
    )


def build_oxford_flowers(root: Path) -> Expected:
    names = ["pink primrose", "hard-leaved pocket orchid", "canterbury bells"]
    (root / "oxford_flowers").mkdir(parents=True, exist_ok=True)
    (root / "oxford_flowers" / "cat_to_name.json").write_text(
        json.dumps({str(i + 1): n for i, n in enumerate(names)}), encoding="utf-8"
    )
    return _split_dataset(
        root,
        "oxford_flowers",
        "jpg",
        "split_zhou_OxfordFlowers.json",
        names,
        (3, 2, 2),
        lambda label, split, n: f"image_{label}{split}{n:04d}.jpg",
    )


def build_food101(root: Path) -> Expected:
    names = ["apple pie", "baby back ribs", "baklava"]
    return _split_dataset(
        root, "food-101", "images", "split_zhou_Food101.json", names, (3, 2, 2), _folder_path(names)
    )


def build_sun397(root: Path) -> Expected:
    names = ["abbey", "airplane cabin", "airport terminal"]
    return _split_dataset(
        root,
        "sun397",
        "SUN397",
        "split_zhou_SUN397.json",
        names,
        (3, 2, 2),
        lambda label, split, n: f"a/{names[label].replace(' ', '_')}/sun_{split}{n}.jpg",
    )


def build_dtd(root: Path) -> Expected:
    names = ["banded", "blotchy", "braided"]
    return _split_dataset(
        root, "dtd", "images", "split_zhou_DescribableTextures.json", names, (3, 2, 2), _folder_path(names)
    )


def build_eurosat(root: Path) -> Expected:
    names = ["Annual Crop Land", "Forest", "Herbaceous Vegetation Land"]
    return _split_dataset(
        root,
        "eurosat",
        "2750",
        "split_zhou_EuroSAT.json",
        names,
        (3, 2, 2),
        lambda label, split, n: f"{['AnnualCrop', 'Forest', 'HerbaceousVegetation'][label]}/{split}_{n}.jpg",
    )


def build_ucf101(root: Path) -> Expected:
    names = ["Apply_Eye_Makeup", "Apply_Lipstick", "Archery"]
    return _split_dataset(
        root,
        "ucf101",
        "UCF-101-midframes",
        "split_zhou_UCF101.json",
        names,
        (3, 2, 2),
        lambda label, split, n: f"{names[label]}/v_{names[label]}_g{n:02d}_{split}.jpg",
    )


def build_fgvc_aircraft(root: Path) -> Expected:
    variants = ["707-320", "A300B4", "Cessna 172"]
    base = root / "fgvc_aircraft"
    (base / "images").mkdir(parents=True, exist_ok=True)
    (base / "variants.txt").write_text("\n".join(variants) + "\n", encoding="utf-8")
    per_class = {"train": 3, "val": 2, "test": 2}
    seed = 100
    for split, n in per_class.items():
        lines = []
        for i in range(n):
            for label, name in enumerate(variants):
                imname = f"{label}{split[:2]}{i:04d}"
                write_image(base / "images" / f"{imname}.jpg", seed)
                seed += 1
                lines.append(f"{imname} {name}")
        (base / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return Expected(variants, {s: n * len(variants) for s, n in per_class.items()})


# ImageNet-style class list: sorted wnids (as CoOp's classnames.txt), names with spaces.
WNIDS = {
    "n01440764": "tench",
    "n01443537": "goldfish",
    "n01484850": "great white shark",
    "n01491361": "tiger shark",
}


def _write_classnames(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "classnames.txt").write_text("".join(f"{w} {n}\n" for w, n in WNIDS.items()), encoding="utf-8")


def _wnid_folders(base: Path, wnids: list[str], per_class: int, seed: int) -> None:
    for wnid in wnids:
        for i in range(per_class):
            write_image(base / wnid / f"{wnid}_{i}.JPEG", seed)
            seed += 1


def build_imagenet(root: Path) -> Expected:
    base = root / "imagenet"
    _write_classnames(base)
    wnids = sorted(WNIDS)
    _wnid_folders(base / "images" / "train", wnids, 4, 200)
    _wnid_folders(base / "images" / "val", wnids, 2, 300)
    return Expected(
        [WNIDS[w] for w in wnids], {"train": 16, "val": 8, "test": 8}, imagenet_labels=list(range(len(wnids)))
    )


def build_imagenetv2(root: Path) -> Expected:
    base = root / "imagenetv2"
    _write_classnames(base)
    for label in range(len(WNIDS)):
        for i in range(2):
            write_image(
                base / "imagenetv2-matched-frequency-format-val" / str(label) / f"{i}.jpeg",
                400 + label * 2 + i,
            )
    return Expected(list(WNIDS.values()), {"train": 0, "val": 0, "test": 8}, imagenet_labels=[0, 1, 2, 3])


def build_imagenet_sketch(root: Path) -> Expected:
    base = root / "imagenet-sketch"
    _write_classnames(base)
    _wnid_folders(base / "images", sorted(WNIDS), 2, 500)
    return Expected(list(WNIDS.values()), {"train": 0, "val": 0, "test": 8}, imagenet_labels=[0, 1, 2, 3])


def _subset_variant(root: Path, folder: str, image_dir: str, seed: int) -> Expected:
    # A 2-class subset (the 2nd and 4th ImageNet classes) plus the README.txt the real archives contain.
    base = root / folder
    _write_classnames(base)
    subset = ["n01443537", "n01491361"]
    _wnid_folders(base / image_dir, subset, 3, seed)
    (base / image_dir / "README.txt").write_text("not a class\n", encoding="utf-8")
    return Expected([WNIDS[w] for w in subset], {"train": 0, "val": 0, "test": 6}, imagenet_labels=[1, 3])


def build_imagenet_a(root: Path) -> Expected:
    return _subset_variant(root, "imagenet-adversarial", "imagenet-a", 600)


def build_imagenet_r(root: Path) -> Expected:
    return _subset_variant(root, "imagenet-rendition", "imagenet-r", 700)


BUILDERS = {
    "ImageNet": build_imagenet,
    "Caltech101": build_caltech101,
    "OxfordPets": build_oxford_pets,
    "StanfordCars": build_stanford_cars,
    "OxfordFlowers": build_oxford_flowers,
    "Food101": build_food101,
    "FGVCAircraft": build_fgvc_aircraft,
    "SUN397": build_sun397,
    "DTD": build_dtd,
    "EuroSAT": build_eurosat,
    "UCF101": build_ucf101,
    "ImageNetV2": build_imagenetv2,
    "ImageNetSketch": build_imagenet_sketch,
    "ImageNetA": build_imagenet_a,
    "ImageNetR": build_imagenet_r,
}


def build_generic(root: Path, name: str = "mydata", per_class: tuple[int, int, int] = (6, 2, 3)) -> Expected:
    """A user dataset: <root>/<name>/images/... + split_zhou_<Name>.json (generic reader)."""
    names = ["red square", "green circle", "blue triangle"]
    return _split_dataset(
        root, name, "images", f"split_zhou_{name.title()}.json", names, per_class, _folder_path(names, "png")
    )
