"""Split files + feature cache -> the engine's inputs (FewShotFeatures, EvalFeatures, online TrainImages)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from pipeline.data.datasets import DatasetError, Item
from pipeline.data.fewshot import FewShotSplit, read_eval_list, read_fewshot_split
from pipeline.data.images import train_key
from pipeline.engine.inputs import EvalFeatures, FewShotFeatures, TrainImages
from pipeline.features.cache import FeatureCache, FeatureConfig, feature_cache_dir, open_feature_cache


def _labels(items: Sequence[Item]) -> torch.Tensor:
    return torch.tensor([item.label for item in items], dtype=torch.long)


def load_fewshot_features(
    cache_root: Path | str,
    split_file: Path | str,
    config: FeatureConfig,
    test_file: Path | str | None = None,
    cache: FeatureCache | None = None,
    data_root: Path | str | None = None,
    num_workers: int = 0,
    split: FewShotSplit | None = None,
) -> FewShotFeatures:
    """Features of one few-shot split file (train views, val, and the dataset's test list).

    `test_file` defaults to ``test.json`` beside the split file. Pass an already opened `cache` to assemble
    several splits of one dataset without reloading the cache. In online mode (`config.online`) `train` is
    each train image's test-transform view, and with `data_root` the result also carries the split's
    `TrainImages` (decoded by `num_workers` processes), which training needs; without it, it serves the
    baselines only. `split` is the split file's content when the caller has already read it.
    """
    if split is None:
        split = read_fewshot_split(split_file)
    evaluation = read_eval_list(test_file if test_file is not None else Path(split_file).parent / "test.json")
    if evaluation.dataset != split.dataset or evaluation.classnames != split.classnames:
        raise DatasetError(
            f"{split_file} and {test_file} belong to different datasets or class lists; rerun the prepare stage."
        )
    if cache is None:
        cache = open_feature_cache(
            feature_cache_dir(cache_root, split.dataset, config.arch, config.pretrained), config
        )
    paths = [item.path for item in split.train]
    if config.online:
        train = cache.gather("eval", paths).unsqueeze(1)
    else:
        train = cache.gather("train", [train_key(p, split.seed, config.views_per_seed) for p in paths])
    train_images = None
    if config.online and data_root is not None:
        train_images = TrainImages(
            data_root=str(Path(data_root).resolve()),
            paths=tuple(paths),
            image_size=config.image_size,
            mean=config.mean,
            std=config.std,
            augment_seed=config.augment_seed,
            num_workers=num_workers,
        )
    return FewShotFeatures(
        classnames=split.classnames,
        train=train,
        train_labels=_labels(split.train),
        val=cache.gather("eval", [item.path for item in split.val]),
        val_labels=_labels(split.val),
        test=cache.gather("eval", [item.path for item in evaluation.test]),
        test_labels=_labels(evaluation.test),
        dataset=split.dataset,
        template=evaluation.template,
        val_is_test=split.val_is_test,
        train_images=train_images,
    )


def load_eval_features(
    cache_root: Path | str, test_file: Path | str, config: FeatureConfig, cache: FeatureCache | None = None
) -> EvalFeatures:
    """Test features of one dataset from its ``test.json`` (e.g. ImageNet-A for an ImageNet-trained context)."""
    evaluation = read_eval_list(test_file)
    if cache is None:
        cache = open_feature_cache(
            feature_cache_dir(cache_root, evaluation.dataset, config.arch, config.pretrained), config
        )
    return EvalFeatures(
        dataset=evaluation.dataset,
        classnames=evaluation.classnames,
        test=cache.gather("eval", [item.path for item in evaluation.test]),
        test_labels=_labels(evaluation.test),
        template=evaluation.template,
        imagenet_labels=evaluation.imagenet_labels,
    )
