"""The evaluation stages' inputs: feature caches and prepare's lists; StageError names the stage to run."""

from __future__ import annotations

from pipeline.data.datasets import dataset_folder
from pipeline.data.fewshot import eval_list_path
from pipeline.data.fewshot import is_test_only as recorded_test_only
from pipeline.errors import UserError
from pipeline.features.cache import (
    FeatureCache,
    FeatureCacheError,
    FeatureConfig,
    feature_cache_dir,
    open_feature_cache,
)
from pipeline.params import Params


class StageError(UserError, RuntimeError):
    """An evaluation stage cannot run: missing inputs or services; the message names the fix."""


def open_cache(params: Params, dataset: str, config: FeatureConfig) -> FeatureCache:
    """The dataset's feature cache under features.dir; StageError says how to build it."""
    folder = dataset_folder(dataset)
    try:
        cache_dir = feature_cache_dir(params.features.dir, folder, config.arch, config.pretrained)
        return open_feature_cache(cache_dir, config)
    except FeatureCacheError as error:
        raise StageError(
            f"{error}\nRun `dvc repro features` (or python -m stages.features --dataset {folder})."
        ) from None


def is_test_only(params: Params, dataset: str) -> bool:
    """True for datasets without few-shot splits (ImageNet variants), as the prepare stage's list says."""
    path = eval_list_path(params.data.splits_dir, dataset_folder(dataset))
    if not path.exists():
        raise StageError(f"{path} is missing; run `dvc repro prepare` (python -m stages.prepare).")
    return recorded_test_only(params.data.splits_dir, dataset)
