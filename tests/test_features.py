"""The features package: correct cached features, incremental updates, manifest checks, corrupt input, assembly."""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from fixtures_data import build_generic, build_imagenet_a
from PIL import Image

import pipeline.features.cache as cache_module
from pipeline.data.datasets import load_dataset
from pipeline.data.fewshot import (
    eval_list_path,
    make_eval_list,
    make_fewshot_split,
    read_fewshot_split,
    split_path,
    write_eval_list,
    write_fewshot_split,
)
from pipeline.data.images import ImageReadError, build_transforms
from pipeline.engine.backbone import Backbone, load_backbone
from pipeline.features.assemble import load_eval_features, load_fewshot_features
from pipeline.features.build import build_dataset_features, split_image_paths
from pipeline.features.cache import (
    CacheMismatchError,
    FeatureCacheError,
    FeatureConfig,
    feature_cache_dir,
    open_feature_cache,
)
from pipeline.params import ParamsError, params_from_dict


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights are expected here
        return load_backbone("coop-tiny", None)


class Counter:
    """Counts images passed to the real encoder (calls through to it)."""

    def __init__(self, backbone: Backbone, monkeypatch: pytest.MonkeyPatch) -> None:
        self.images = 0
        real = backbone.encode_images

        def counting(x: torch.Tensor) -> torch.Tensor:
            self.images += x.shape[0]
            return real(x)

        monkeypatch.setattr(backbone, "encode_images", counting)


def prepare(root: Path, shots: list[int], seeds: list[int], name: str = "mydata") -> Path:
    """Write split files for a generic dataset under root/data; returns the splits dir."""
    splits = load_dataset(name, root / "data")
    out = root / "splits"
    write_eval_list(make_eval_list(splits), eval_list_path(out, splits.name))
    if not splits.test_only:
        for k in shots:
            for seed in seeds:
                write_fewshot_split(
                    make_fewshot_split(splits, k, seed), split_path(out, splits.name, k, seed)
                )
    return out


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    build_generic(tmp_path / "data", "mydata")  # 3 classes x (6 train, 2 val, 3 test)
    prepare(tmp_path, [2], [1])
    return tmp_path


def build(root: Path, backbone: Backbone, shots=(2,), seeds=(1,), **kwargs):
    return build_dataset_features(
        root / "cache",
        root / "data",
        root / "splits",
        "mydata",
        shots,
        seeds,
        backbone,
        batch_size=4,
        **kwargs,
    )


def cache_files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (root / "cache").rglob("*") if p.is_file()}


def test_builds_cache_with_progress_and_correct_features(
    tiny: Path, backbone: Backbone, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    counter = Counter(backbone, monkeypatch)
    update = build(tiny, backbone, views=1, dtype="float32")
    train, evaluation = split_image_paths(tiny / "splits", "mydata", [2], [1])
    assert update.encoded == {"train": len(train), "eval": len(evaluation)}
    assert counter.images == len(train) + len(evaluation)
    err = capsys.readouterr().err
    assert "encode train" in err and "encode eval" in err and f"{len(evaluation)}/{len(evaluation)}" in err

    config = FeatureConfig.from_backbone(backbone, views=1, dtype="float32")
    feats = load_fewshot_features(tiny / "cache", tiny / "splits" / "mydata" / "shot2_seed1.json", config)
    assert feats.train.shape == (6, 1, 64) and feats.train.dtype == torch.float32
    assert feats.val.shape == (6, 64) and feats.test.shape == (9, 64)
    assert feats.train_labels.tolist() == [0, 0, 1, 1, 2, 2] and feats.test_labels.dtype == torch.int64
    assert feats.classnames == ["red square", "green circle", "blue triangle"]
    # A caller that has already read the split file hands it in, and that split is the one used (here its
    # train list reversed, so the file is not read again).
    split = read_fewshot_split(tiny / "splits" / "mydata" / "shot2_seed1.json")
    given = load_fewshot_features(tiny / "cache", tiny / "splits" / "mydata" / "shot2_seed1.json", config,
                                  split=replace(split, train=split.train[::-1]))
    assert torch.equal(given.train, feats.train.flip(0)) and given.train_labels.tolist() == [2, 2, 1, 1, 0, 0]
    assert torch.equal(given.val, feats.val) and torch.equal(given.test, feats.test)

    # A cached row is the backbone's feature of that very image under the test transform.
    test_items = load_dataset("mydata", tiny / "data").test
    _, test_tf = build_transforms(backbone.image_size, backbone.mean, backbone.std)
    image = Image.open(tiny / "data" / test_items[4].path).convert("RGB")
    direct = backbone.encode_images(test_tf(image).unsqueeze(0))[0]
    assert torch.allclose(feats.test[4], direct, atol=1e-4)
    assert not torch.allclose(feats.test[4], feats.test[5])


def test_second_run_encodes_nothing(tiny: Path, backbone: Backbone, monkeypatch: pytest.MonkeyPatch) -> None:
    build(tiny, backbone, views=2)
    before = cache_files(tiny)
    counter = Counter(backbone, monkeypatch)
    update = build(tiny, backbone, views=2)
    assert update.encoded == {"train": 0, "eval": 0} and counter.images == 0
    assert cache_files(tiny) == before  # not even rewritten


def test_incremental_encodes_only_new_images(
    tiny: Path, backbone: Backbone, monkeypatch: pytest.MonkeyPatch
) -> None:
    build(tiny, backbone, views=2)
    old_train, old_eval = split_image_paths(tiny / "splits", "mydata", [2], [1], per_seed=True)
    old = open_feature_cache(
        feature_cache_dir(tiny / "cache", "mydata", "coop-tiny", None),
        FeatureConfig.from_backbone(backbone, views=2),
    )
    prepare(tiny, [2, 4], [1, 2])
    new_train, new_eval = split_image_paths(tiny / "splits", "mydata", [2, 4], [1, 2], per_seed=True)
    counter = Counter(backbone, monkeypatch)
    update = build(tiny, backbone, shots=(2, 4), seeds=(1, 2), views=2)
    assert update.encoded == {"train": len(new_train - old_train), "eval": len(new_eval - old_eval)}
    assert update.encoded["train"] > 0
    assert counter.images == 2 * update.encoded["train"] + update.encoded["eval"]  # 2 views per train image
    new = open_feature_cache(old.cache_dir, FeatureConfig.from_backbone(backbone, views=2))
    assert torch.equal(new.gather("train", sorted(old_train)), old.gather("train", sorted(old_train)))


def test_views_are_seeded_per_image(tmp_path: Path, backbone: Backbone) -> None:
    build_generic(tmp_path / "data", "mydata")
    prepare(tmp_path, [2], [1])
    build(tmp_path, backbone, views=3, dtype="float32")
    config = FeatureConfig.from_backbone(backbone, views=3, dtype="float32")
    feats = load_fewshot_features(
        tmp_path / "cache", tmp_path / "splits" / "mydata" / "shot2_seed1.json", config
    )
    assert feats.train.shape == (6, 3, 64)
    assert not torch.allclose(feats.train[0, 0], feats.train[0, 1])  # views differ
    # A fresh cache (other folder, other batch size) reproduces the same augmented views.
    other = tmp_path / "other"
    build_dataset_features(
        other,
        tmp_path / "data",
        tmp_path / "splits",
        "mydata",
        [2],
        [1],
        backbone,
        3,
        "float32",
        batch_size=5,
    )
    again = load_fewshot_features(other, tmp_path / "splits" / "mydata" / "shot2_seed1.json", config)
    assert torch.allclose(again.train, feats.train, atol=1e-5)
    # Another augmentation seed gives other views.
    seed7 = tmp_path / "seed7"
    build_dataset_features(
        seed7,
        tmp_path / "data",
        tmp_path / "splits",
        "mydata",
        [2],
        [1],
        backbone,
        3,
        "float32",
        augment_seed=7,
    )
    config7 = FeatureConfig.from_backbone(backbone, views=3, dtype="float32", augment_seed=7)
    moved = load_fewshot_features(seed7, tmp_path / "splits" / "mydata" / "shot2_seed1.json", config7)
    assert not torch.allclose(moved.train, feats.train)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"views": 4}, "views"),
        ({"dtype": "float32"}, "dtype"),
        ({"fingerprint": "coop-tiny:0000"}, "fingerprint"),
        ({"image_size": 64}, "transform.image_size"),
        ({"views_per_seed": False}, "views_per_seed"),
    ],
)
def test_reader_refuses_mismatched_cache(tiny: Path, backbone: Backbone, change: dict, field: str) -> None:
    build(tiny, backbone, views=2)
    config = FeatureConfig.from_backbone(backbone, views=2)
    wrong = FeatureConfig(**{**config.__dict__, **change})
    with pytest.raises(CacheMismatchError, match=rf"{field}: cache has .*dvc repro features"):
        load_fewshot_features(tiny / "cache", tiny / "splits" / "mydata" / "shot2_seed1.json", wrong)


def test_writer_rebuilds_cache_of_other_config(tiny: Path, backbone: Backbone, monkeypatch) -> None:
    build(tiny, backbone, views=1)
    counter = Counter(backbone, monkeypatch)
    update = build(tiny, backbone, views=2)
    assert update.rebuilt and counter.images == 2 * update.encoded["train"] + update.encoded["eval"]
    cache_dir = feature_cache_dir(tiny / "cache", "mydata", "coop-tiny", None)
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    shard_files = {s["file"] for store in manifest["stores"].values() for s in store["shards"]}
    assert {p.name for p in cache_dir.glob("*.safetensors")} == shard_files  # old shards removed
    open_feature_cache(cache_dir, FeatureConfig.from_backbone(backbone, views=2))


def test_corrupt_image_named_and_nothing_written(tiny: Path, backbone: Backbone) -> None:
    victim = load_dataset("mydata", tiny / "data").test[2]
    (tiny / "data" / victim.path).write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    with pytest.raises(ImageReadError, match="Cannot read image .*" + victim.path.split("/")[-1]):
        build(tiny, backbone)
    assert not (tiny / "cache").exists() or cache_files(tiny) == {}


def test_corrupt_image_leaves_existing_cache_untouched(tiny: Path, backbone: Backbone) -> None:
    build(tiny, backbone)
    before = cache_files(tiny)
    prepare(tiny, [4], [1])
    splits = load_dataset("mydata", tiny / "data")
    cached_train, _ = split_image_paths(tiny / "splits", "mydata", [2], [1])
    victim = next(i for i in splits.train if i.path not in cached_train)
    (tiny / "data" / victim.path).write_bytes(b"garbage")
    with pytest.raises(ImageReadError, match=victim.path.split("/")[-1]):
        build(tiny, backbone, shots=(2, 4))
    assert cache_files(tiny) == before


def test_missing_rows_and_missing_cache(tiny: Path, backbone: Backbone) -> None:
    config = FeatureConfig.from_backbone(backbone)
    with pytest.raises(FeatureCacheError, match="No feature cache .*manifest.json missing"):
        load_fewshot_features(tiny / "cache", tiny / "splits" / "mydata" / "shot2_seed1.json", config)
    build(tiny, backbone)
    prepare(tiny, [4], [1])
    with pytest.raises(FeatureCacheError, match="not in the train feature cache"):
        load_fewshot_features(tiny / "cache", tiny / "splits" / "mydata" / "shot4_seed1.json", config)


def test_corrupt_shard_refused_then_rebuilt(tiny: Path, backbone: Backbone) -> None:
    build(tiny, backbone)
    cache_dir = feature_cache_dir(tiny / "cache", "mydata", "coop-tiny", None)
    (cache_dir / "eval-00000.safetensors").write_bytes(b"broken")
    config = FeatureConfig.from_backbone(backbone)
    with pytest.raises(FeatureCacheError, match="eval-00000.safetensors is corrupt"):
        open_feature_cache(cache_dir, config)
    update = build(tiny, backbone)
    assert update.rebuilt and update.encoded["eval"] > 0
    open_feature_cache(cache_dir, config)


def test_shards_are_merged(tiny: Path, backbone: Backbone, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache_module, "MAX_SHARDS", 1)
    build(tiny, backbone)
    prepare(tiny, [2, 4], [1, 2])
    build(tiny, backbone, shots=(2, 4), seeds=(1, 2))
    cache_dir = feature_cache_dir(tiny / "cache", "mydata", "coop-tiny", None)
    shards = sorted(p.name for p in cache_dir.glob("*.safetensors"))
    assert len(shards) == 2 and shards[0].startswith("eval-") and shards[1].startswith("train-")
    train, _ = split_image_paths(tiny / "splits", "mydata", [2, 4], [1, 2])
    cache = open_feature_cache(cache_dir, FeatureConfig.from_backbone(backbone))
    assert sorted(cache.paths("train")) == sorted(train)


def test_test_only_dataset_eval_features(tmp_path: Path, backbone: Backbone) -> None:
    build_imagenet_a(tmp_path / "data")
    splits_dir = prepare(tmp_path, [], [], name="ImageNetA")
    update = build_dataset_features(
        tmp_path / "cache", tmp_path / "data", splits_dir, "ImageNetA", [16], [1], backbone
    )
    assert update.encoded == {"train": 0, "eval": 6}
    feats = load_eval_features(
        tmp_path / "cache", splits_dir / "ImageNetA" / "test.json", FeatureConfig.from_backbone(backbone)
    )
    assert feats.test.shape == (6, 64) and feats.imagenet_labels == [1, 3]
    assert feats.test_labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_views_differ_between_seeds_and_only_missing_keys_are_encoded(
    tmp_path: Path, backbone: Backbone, monkeypatch: pytest.MonkeyPatch
) -> None:
    build_generic(tmp_path / "data", "mydata")
    prepare(tmp_path, [4], [1, 2])  # 4 of 6 images per class: the two seeds share images
    build(tmp_path, backbone, shots=(4,), seeds=(1,), views=2, dtype="float32")
    counter = Counter(backbone, monkeypatch)
    update = build(tmp_path, backbone, shots=(4,), seeds=(1, 2), views=2, dtype="float32")
    seed2 = split_image_paths(tmp_path / "splits", "mydata", [4], [2], per_seed=True)[0]
    assert update.encoded == {"train": len(seed2), "eval": update.encoded["eval"]} and not update.rebuilt
    assert counter.images == 2 * len(seed2) + update.encoded["eval"]  # seed 1's views were kept

    config = FeatureConfig.from_backbone(backbone, views=2, dtype="float32")
    cache = open_feature_cache(feature_cache_dir(tmp_path / "cache", "mydata", "coop-tiny", None), config)
    splits = [tmp_path / "splits" / "mydata" / f"shot4_seed{s}.json" for s in (1, 2)]
    one, two = (load_fewshot_features(tmp_path / "cache", s, config, cache=cache) for s in splits)
    paths = [[item.path for item in read_fewshot_split(s).train] for s in splits]
    shared = sorted(set(paths[0]) & set(paths[1]))
    assert shared and f"{shared[0]}#seed1" in cache.paths("train") and f"{shared[0]}#seed2" in cache.paths("train")
    for path in shared:
        assert not torch.allclose(one.train[paths[0].index(path)], two.train[paths[1].index(path)])

    # The rule, written out: view v of an image in split seed S is seeded by sha256("<base>\0<v>\0<path>#seed<S>").
    train_tf, _ = build_transforms(backbone.image_size, backbone.mean, backbone.std)
    image = Image.open(tmp_path / "data" / shared[0]).convert("RGB")
    digest = hashlib.sha256(f"0\x001\x00{shared[0]}#seed2".encode()).digest()
    torch.manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    direct = backbone.encode_images(train_tf(image).unsqueeze(0))[0]
    assert torch.allclose(two.train[paths[1].index(shared[0]), 1], direct, atol=1e-4)

    # Same seed rebuilt elsewhere (other batch size): identical views. Without per-seed views the seeds share them.
    build_dataset_features(tmp_path / "again", tmp_path / "data", tmp_path / "splits", "mydata", [4], [2], backbone,
                           2, "float32", batch_size=5, progress=False)
    assert torch.allclose(load_fewshot_features(tmp_path / "again", splits[1], config).train, two.train, atol=1e-5)
    build_dataset_features(tmp_path / "shared", tmp_path / "data", tmp_path / "splits", "mydata", [4], [1, 2],
                           backbone, 2, "float32", progress=False, views_per_seed=False)
    common = replace(config, views_per_seed=False)
    one, two = (load_fewshot_features(tmp_path / "shared", s, common) for s in splits)
    assert torch.equal(one.train[paths[0].index(shared[0])], two.train[paths[1].index(shared[0])])


def test_cache_of_other_views_per_seed_is_rebuilt(tiny: Path, backbone: Backbone) -> None:
    build(tiny, backbone, views=2, views_per_seed=False)
    update = build(tiny, backbone, views=2)
    assert update.rebuilt and update.encoded["train"] > 0
    cache = open_feature_cache(feature_cache_dir(tiny / "cache", "mydata", "coop-tiny", None),
                               FeatureConfig.from_backbone(backbone, views=2))
    assert all(key.endswith("#seed1") for key in cache.paths("train"))


def test_cache_written_before_views_per_seed_existed_stays_valid(tiny: Path, backbone: Backbone) -> None:
    """Older manifests lack the key; their views were shared by seeds, so with views_per_seed off they match."""
    build(tiny, backbone, views=2, views_per_seed=False)
    manifest_path = feature_cache_dir(tiny / "cache", "mydata", "coop-tiny", None) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["config"]["views_per_seed"]
    manifest_path.write_text(json.dumps(manifest))
    update = build(tiny, backbone, views=2, views_per_seed=False)
    assert not update.rebuilt and update.encoded == {"train": 0, "eval": 0}


@pytest.mark.parametrize("views", [0, -2, "sometimes", "4", True, 2.0, None])
def test_params_and_feature_config_share_one_views_rule(backbone: Backbone, views: object) -> None:
    with pytest.raises(ParamsError, match=r"features.views must be >= 1 .* or 'online'"):
        FeatureConfig.from_backbone(backbone, views=views)
    if views not in (True, 2.0, None):  # the params file's type check already names these
        with pytest.raises(ParamsError, match=r"features.views must be >= 1 .* or 'online'"):
            params_from_dict({"features": {"views": views}})
    for good in (1, 3, "online"):
        assert FeatureConfig.from_backbone(backbone, views=good).views == good
        assert params_from_dict({"features": {"views": good}}).features.views == good


@pytest.mark.parametrize(
    ("features", "message"),
    [
        ({"views": "sometimes"}, r"features.views must be >= 1 .* or 'online'.*'sometimes'"),
        ({"views": 0}, r"features.views must be >= 1 .* or 'online'"),
        ({"views": True}, "features.views: expected an integer"),
        ({"views_per_seed": "yes"}, "features.views_per_seed: expected true/false"),
        ({"online_workers": -1}, "features.online_workers must be >= 0"),
    ],
)
def test_bad_feature_params_name_the_key(features: dict, message: str) -> None:
    with pytest.raises(ParamsError, match=message):
        params_from_dict({"features": features})
    assert params_from_dict({"features": {"views": "online", "views_per_seed": False}}).features.views == "online"
