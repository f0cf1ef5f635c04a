"""Dataset readers: every CoOp dataset in its official layout, the generic reader, the demo set, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fixtures_data import BUILDERS, WNIDS, build_generic, build_imagenet_a, build_oxford_pets, write_image
from PIL import Image

from pipeline.data.datasets import DATASETS, DatasetError, load_dataset
from pipeline.data.demo import DEMO_DATASET, demo_root

TEMPLATES = {
    "OxfordPets": "a photo of a {}, a type of pet.",
    "OxfordFlowers": "a photo of a {}, a type of flower.",
    "FGVCAircraft": "a photo of a {}, a type of aircraft.",
    "DTD": "{} texture.",
    "EuroSAT": "a centered satellite photo of {}.",
    "Food101": "a photo of {}, a type of food.",
    "UCF101": "a photo of a person doing {}.",
}


@pytest.fixture(scope="module")
def all_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("data")
    return root, {name: build(root) for name, build in BUILDERS.items()}


def test_registry_covers_the_15_coop_datasets() -> None:
    assert set(BUILDERS) <= set(DATASETS)
    assert len(BUILDERS) == 15


@pytest.mark.parametrize("name", list(BUILDERS))
def test_reads_official_layout(all_root: tuple[Path, dict], name: str) -> None:
    root, expected_all = all_root
    expected = expected_all[name]
    splits = load_dataset(name, root)

    assert splits.name == name
    assert splits.classnames == expected.classnames
    assert {s: len(getattr(splits, s)) for s in ("train", "val", "test")} == expected.counts
    assert splits.template == TEMPLATES.get(name, "a photo of a {}.")
    assert splits.imagenet_labels == expected.imagenet_labels
    for item in splits.train + splits.val + splits.test:
        assert not item.path.startswith("/") and "\\" not in item.path
        assert (root / item.path).is_file()
        assert splits.classnames[item.label] == item.classname
        assert item.path.startswith(DATASETS[name].folder + "/")


def test_split_file_paths_are_joined_with_the_image_dir(all_root: tuple[Path, dict]) -> None:
    root, _ = all_root
    cars = load_dataset("StanfordCars", root)  # image dir is the dataset folder itself
    assert cars.train[0].path.startswith("stanford_cars/cars_train/")
    flowers = load_dataset("OxfordFlowers", root)
    assert flowers.train[0].path.startswith("oxford_flowers/jpg/image_")
    sun = load_dataset("SUN397", root)
    assert sun.test[0].path.startswith("sun397/SUN397/a/")


def test_imagenet_labels_follow_sorted_folders_and_val_is_test(all_root: tuple[Path, dict]) -> None:
    root, _ = all_root
    imagenet = load_dataset("ImageNet", root)
    wnids = sorted(WNIDS)
    for item in imagenet.train:
        assert item.path.split("/")[3] == wnids[item.label]
        assert item.path.startswith("imagenet/images/train/")
    assert imagenet.val == imagenet.test and imagenet.val_is_test
    assert all(item.path.startswith("imagenet/images/val/") for item in imagenet.test)
    assert "great white shark" in imagenet.classnames  # names keep their spaces


def test_imagenet_a_keeps_the_map_to_imagenet_labels(all_root: tuple[Path, dict]) -> None:
    root, _ = all_root
    a = load_dataset("ImageNetA", root)
    imagenet = load_dataset("ImageNet", root)
    assert a.test_only and not a.train and not a.val
    assert sorted({item.label for item in a.test}) == [0, 1]  # README.txt is not a class
    assert a.imagenet_labels is not None
    for label, name in enumerate(a.classnames):
        assert imagenet.classnames[a.imagenet_labels[label]] == name


def test_imagenetv2_labels_are_folder_numbers(all_root: tuple[Path, dict]) -> None:
    root, _ = all_root
    v2 = load_dataset("ImageNetV2", root)
    for item in v2.test:
        assert int(item.path.split("/")[2]) == item.label
        assert item.classname == list(WNIDS.values())[item.label]


def test_aircraft_label_is_line_of_variants_txt(all_root: tuple[Path, dict]) -> None:
    root, _ = all_root
    aircraft = load_dataset("FGVCAircraft", root)
    assert aircraft.classnames[2] == "Cessna 172"  # variant names keep their spaces
    assert all(
        item.path.startswith("fgvc_aircraft/images/") and item.path.endswith(".jpg") for item in aircraft.test
    )


@pytest.mark.parametrize("alias", ["Flowers102", "oxfordflowers", "oxford_flowers", "OXFORDFLOWERS"])
def test_aliases_and_case(all_root: tuple[Path, dict], alias: str) -> None:
    root, _ = all_root
    assert load_dataset(alias, root).name == "OxfordFlowers"


def test_generic_dataset(tmp_path: Path) -> None:
    expected = build_generic(tmp_path, "mydata")
    splits = load_dataset("mydata", tmp_path)
    assert splits.name == "mydata"
    assert splits.classnames == expected.classnames
    assert len(splits.train) == expected.counts["train"]
    assert splits.train[0].path.startswith("mydata/images/")
    assert splits.template == "a photo of a {}."


def test_generic_dataset_template_from_split_file(tmp_path: Path) -> None:
    build_generic(tmp_path, "mydata")
    split_file = tmp_path / "mydata" / "split_zhou_Mydata.json"
    data = json.loads(split_file.read_text())
    data["template"] = "a drawing of a {}."
    split_file.write_text(json.dumps(data))
    assert load_dataset("mydata", tmp_path).template == "a drawing of a {}."


def test_generic_dataset_may_be_a_test_set_alone(tmp_path: Path) -> None:
    expected = build_generic(tmp_path, "mydata")
    split_file = tmp_path / "mydata" / "split_zhou_Mydata.json"
    data = json.loads(split_file.read_text())
    assert not load_dataset("mydata", tmp_path).test_only
    split_file.write_text(json.dumps({**data, "test_only": True}))
    with pytest.raises(DatasetError, match=r"test-only dataset lists no train or val images, found 18 train and 6 val"):
        load_dataset("mydata", tmp_path)
    split_file.write_text(json.dumps({**data, "train": [], "val": [], "test_only": True}))
    splits = load_dataset("mydata", tmp_path)
    assert splits.test_only and not splits.train and not splits.val
    assert splits.classnames == expected.classnames and len(splits.test) == expected.counts["test"]
    split_file.write_text(json.dumps({**data, "train": [], "val": []}))  # without the flag: a train set is due
    with pytest.raises(DatasetError, match="the train split is empty"):
        load_dataset("mydata", tmp_path)
    split_file.write_text(json.dumps({**data, "test_only": "yes"}))
    with pytest.raises(DatasetError, match="'test_only' must be true or false, got 'yes'"):
        load_dataset("mydata", tmp_path)


# ------------------------------------------------------------------------------------------- demo


def test_demo_dataset_is_balanced_fashion_mnist() -> None:
    root = demo_root()
    splits = load_dataset(DEMO_DATASET, root)
    assert splits.classnames == [
        "t-shirt",
        "trouser",
        "pullover",
        "dress",
        "coat",
        "sandal",
        "shirt",
        "sneaker",
        "bag",
        "ankle boot",
    ]
    for split, per_class in (("train", 32), ("val", 8), ("test", 20)):
        items = getattr(splits, split)
        assert [sum(1 for i in items if i.label == c) for c in range(10)] == [per_class] * 10
    with Image.open(root / splits.test[0].path) as image:
        assert image.size == (28, 28) and image.mode == "L"
    paths = {i.path for i in splits.train + splits.val + splits.test}
    assert len(paths) == 600  # no image is in two splits
    total = sum(p.stat().st_size for p in (root / "fashion_mnist").rglob("*") if p.is_file())
    assert total < 1024 * 1024
    assert load_dataset("fashion_mnist", root).name == "FashionMNIST"


# -------------------------------------------------------------------------------------- bad input


def _edit_split(root: Path, edit) -> None:
    path = root / "oxford_pets" / "split_zhou_OxfordPets.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.fixture
def pets_root(tmp_path: Path) -> Path:
    build_oxford_pets(tmp_path)
    return tmp_path


def test_unknown_dataset_lists_known_ones(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="Unknown dataset 'Pets2'") as info:
        load_dataset("Pets2", tmp_path)
    assert "OxfordPets" in str(info.value) and "ImageNetR" in str(info.value)
    assert "split_zhou_<Name>.json" in str(info.value)  # says how to add one


def test_missing_data_root(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="Data root .*nowhere does not exist"):
        load_dataset("OxfordPets", tmp_path / "nowhere")


def test_missing_dataset_folder_shows_layout(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as info:
        load_dataset("DTD", tmp_path)
    message = str(info.value)
    assert str(tmp_path / "dtd") in message
    assert "Expected layout" in message and "split_zhou_DescribableTextures.json" in message


def test_missing_split_file_named(pets_root: Path) -> None:
    (pets_root / "oxford_pets" / "split_zhou_OxfordPets.json").unlink()
    with pytest.raises(DatasetError, match="split_zhou_OxfordPets.json is missing"):
        load_dataset("OxfordPets", pets_root)


def test_missing_classnames_txt_named(tmp_path: Path) -> None:
    build_imagenet_a(tmp_path)
    (tmp_path / "imagenet-adversarial" / "classnames.txt").unlink()
    with pytest.raises(DatasetError, match="classnames.txt is missing"):
        load_dataset("ImageNetA", tmp_path)


@pytest.mark.parametrize("bad", ["/etc/passwd", "../outside.jpg", "a/../../b.jpg", "C:\\x.jpg"])
def test_rejects_escaping_paths(pets_root: Path, bad: str) -> None:
    _edit_split(pets_root, lambda d: d["train"].__setitem__(0, [bad, 0, "abyssinian"]))
    with pytest.raises(DatasetError, match=r"absolute|'\.\.'"):
        load_dataset("OxfordPets", pets_root)


def test_label_with_two_names_is_rejected(pets_root: Path) -> None:
    _edit_split(pets_root, lambda d: d["test"][0].__setitem__(2, "bengal"))
    with pytest.raises(DatasetError, match="label 0 is called 'abyssinian' in train but 'bengal' in test"):
        load_dataset("OxfordPets", pets_root)


def test_label_gap_is_rejected(pets_root: Path) -> None:
    def shift(data: dict) -> None:
        for split in ("train", "val", "test"):
            for entry in data[split]:
                if entry[1] == 2:
                    entry[1] = 5

    _edit_split(pets_root, shift)
    with pytest.raises(DatasetError, match=r"0\.\.C-1 .*missing \[2, 3, 4\]"):
        load_dataset("OxfordPets", pets_root)


def test_malformed_entry_is_rejected(pets_root: Path) -> None:
    _edit_split(pets_root, lambda d: d["val"].__setitem__(1, ["x.jpg", "zero", "abyssinian"]))
    with pytest.raises(DatasetError, match=r"val\[1\].*label must be an integer"):
        load_dataset("OxfordPets", pets_root)


def test_invalid_json_is_named(pets_root: Path) -> None:
    (pets_root / "oxford_pets" / "split_zhou_OxfordPets.json").write_text("{not json")
    with pytest.raises(DatasetError, match="split_zhou_OxfordPets.json is not valid JSON"):
        load_dataset("OxfordPets", pets_root)


def test_missing_image_file_is_reported(pets_root: Path) -> None:
    victim = load_dataset("OxfordPets", pets_root).test[1]
    (pets_root / victim.path).unlink()
    with pytest.raises(DatasetError, match="1 listed image") as info:
        load_dataset("OxfordPets", pets_root)
    assert victim.path in str(info.value)
    # The file check can be skipped, e.g. for a huge dataset whose images are known present.
    assert len(load_dataset("OxfordPets", pets_root, check_files=False).test) == 6


def test_aircraft_unknown_variant_names_the_line(tmp_path: Path) -> None:
    BUILDERS["FGVCAircraft"](tmp_path)
    path = tmp_path / "fgvc_aircraft" / "images_variant_val.txt"
    path.write_text(path.read_text() + "0000001 Boeing 999\n")
    with pytest.raises(DatasetError, match=r"images_variant_val.txt:7: .*Boeing 999"):
        load_dataset("FGVCAircraft", tmp_path)


def test_imagenet_folder_not_in_classnames(tmp_path: Path) -> None:
    BUILDERS["ImageNetSketch"](tmp_path)
    write_image(tmp_path / "imagenet-sketch" / "images" / "n99999999" / "x.jpg", 1)
    with pytest.raises(DatasetError, match=r"\['n99999999'\].*not listed in classnames.txt"):
        load_dataset("ImageNetSketch", tmp_path)


def test_generic_folder_with_two_split_files(tmp_path: Path) -> None:
    build_generic(tmp_path, "mydata")
    (tmp_path / "mydata" / "split_other.json").write_text("{}")
    with pytest.raises(DatasetError, match="several split files"):
        load_dataset("mydata", tmp_path)
