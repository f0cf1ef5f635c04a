"""The features stage's library: which images a dataset's split files need, and bringing its cache up to date."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.data.fewshot import eval_list_path, read_eval_list, read_fewshot_split, split_path
from pipeline.data.images import train_key
from pipeline.features.cache import CacheUpdate, FeatureConfig, feature_cache_dir, update_feature_cache

if TYPE_CHECKING:
    from pipeline.engine.backbone import Backbone

log = logging.getLogger(__name__)


def split_image_paths(
    splits_dir: Path | str, dataset: str, shots: Iterable[int], seeds: Iterable[int], per_seed: bool = False
) -> tuple[set[str], set[str]]:
    """(train keys, eval paths) needed by the given few-shot split files plus the dataset's test list.

    Train keys are image paths, or with `per_seed` (FeatureConfig.views_per_seed) `train_key`s: path and
    split seed. Eval paths include the train images: their one test-transform view is what the official
    linear probe (CoOp's lpclip/) trains on. Test-only datasets (ImageNet variants) need just their test
    list; `shots` and `seeds` are ignored.
    """
    train: set[str] = set()
    evaluation_list = read_eval_list(eval_list_path(splits_dir, dataset))
    evaluation: set[str] = {item.path for item in evaluation_list.test}
    if evaluation_list.test_only:
        return train, evaluation
    for k in shots:
        for seed in seeds:
            split = read_fewshot_split(split_path(splits_dir, dataset, k, seed))
            train.update(train_key(item.path, split.seed, per_seed) for item in split.train)
            evaluation.update(item.path for item in (*split.val, *split.train))
    return train, evaluation


def build_dataset_features(
    cache_root: Path | str,
    data_root: Path | str,
    splits_dir: Path | str,
    dataset: str,
    shots: Iterable[int],
    seeds: Iterable[int],
    backbone: Backbone,
    views: int | str = 1,
    dtype: str = "float16",
    augment_seed: int = 0,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = True,
    views_per_seed: bool = True,
) -> CacheUpdate:
    """Bring one dataset's cache up to date for the given split files (what the features stage runs).

    `views` ONLINE_VIEWS caches no train views (training crops the images itself), only the eval store.
    """
    config = FeatureConfig.from_backbone(
        backbone, views=views, dtype=dtype, augment_seed=augment_seed, views_per_seed=views_per_seed
    )
    train, evaluation = split_image_paths(splits_dir, dataset, shots, seeds, config.views_per_seed)
    if config.online:
        train = set()
    cache_dir = feature_cache_dir(cache_root, dataset, backbone.arch, backbone.pretrained)
    update = update_feature_cache(
        cache_dir, data_root, train, evaluation, backbone, config, batch_size, num_workers, progress
    )
    log.info(
        "%s: encoded %d train / %d eval images; cache %s holds %d / %d",
        dataset,
        update.encoded["train"],
        update.encoded["eval"],
        cache_dir,
        update.total["train"],
        update.total["eval"],
    )
    return update
