"""Load, in the driver, the cached few-shot features of every (dataset, shots, seed) a sweep will train on,
and the test features of its cross-dataset transfer targets; check each protocol can run on them.

The features then travel to the trials through Ray's object store, so workers need neither the data nor
the cache on their disks; except in online mode (features.views: online), where each trial crops and
encodes the training images itself: every worker must then see data.root at the same path (a shared
filesystem). A missing split file or feature cache is reported with the stage that makes it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from pipeline.data.datasets import DatasetError, dataset_folder
from pipeline.data.fewshot import eval_list_path, is_test_only, split_path
from pipeline.data.protocols import BASE2NEW, XD
from pipeline.engine.backbone import Backbone, WeightsUnavailableError, load_params_backbone
from pipeline.engine.inputs import EvalFeatures, FewShotFeatures
from pipeline.errors import UserError
from pipeline.features.assemble import load_eval_features, load_fewshot_features
from pipeline.features.cache import (
    FeatureCache,
    FeatureCacheError,
    FeatureConfig,
    feature_cache_dir,
    open_feature_cache,
)
from pipeline.params import Params
from pipeline.sweep.cluster import online_workers
from pipeline.sweep.plan import SweepPlan, feature_key

log = logging.getLogger(__name__)


class MissingInputsError(UserError, RuntimeError):
    """Features (or split files) for a requested dataset are missing; the message names the stage to run."""


@dataclass
class SweepInputs:
    backbone: Backbone
    features: dict[str, FewShotFeatures]  # feature_key(dataset, shots, seed) -> features
    cache_fingerprints: dict[str, str]  # dataset -> fingerprint of its feature cache manifest
    targets: dict[str, EvalFeatures] = field(default_factory=dict)  # transfer target -> its test features


def cache_fingerprint(cache: FeatureCache) -> str:
    """Identifies the exact cache contents (config, shard files and their image lists)."""
    text = json.dumps(cache.manifest, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _fix_hint(params: Params, dataset: str, shots: list[int], seeds: list[int]) -> str:
    shots_arg = " ".join(map(str, shots))
    seeds_arg = " ".join(map(str, seeds))
    return (
        "Run `dvc repro features` (it runs `prepare` first when needed), or directly:\n"
        f"  python -m stages.prepare --params params.yaml --dataset {dataset} --shots {shots_arg} --seeds {seeds_arg}\n"
        f"  python -m stages.features --params params.yaml --dataset {dataset} --shots {shots_arg} --seeds {seeds_arg}\n"
        f"(data.splits_dir={params.data.splits_dir}, features.dir={params.features.dir})"
    )


def transfer_targets(params: Params, plan: SweepPlan) -> list[str]:
    """The datasets xd trials are tested on: transfer.targets, or every other trainable dataset of data.datasets;
    none unless the plan has an xd trial."""
    if XD not in {c["protocol"] for c in plan.configs}:
        return []
    if params.transfer.targets is not None:
        return list(params.transfer.targets)
    return [d for d in params.data.datasets if not is_test_only(params.data.splits_dir, d)]


def check_protocols(plan: SweepPlan, inputs: SweepInputs) -> None:
    """MissingInputsError before any trial runs when a protocol cannot run on the loaded data."""
    for c in plan.configs:
        data = inputs.features[feature_key(c["dataset"], c["shots"], c["seed"])]
        if c["protocol"] == BASE2NEW and len(data.classnames) < 2:
            raise MissingInputsError(
                f"protocol base2new splits a dataset's classes into base and new halves, but {c['dataset']} has "
                f"{len(data.classnames)} class: drop it from sweep.space.dataset for base2new, or the protocol")
        if c["protocol"] == XD and not set(inputs.targets) - {c["dataset"]}:
            raise MissingInputsError(
                f"protocol xd tests {c['dataset']}'s context on other datasets, but there are none: list target "
                "datasets in transfer.targets (or more datasets in data.datasets)")


def load_targets(params: Params, backbone: Backbone, names: list[str]) -> dict[str, EvalFeatures]:
    """Test features of each transfer target; MissingInputsError names the stage that makes them."""
    config = FeatureConfig.from_params(backbone, params.features)
    targets = {}
    for name in names:
        folder = dataset_folder(name)
        try:
            cache = open_feature_cache(
                feature_cache_dir(params.features.dir, folder, backbone.arch, backbone.pretrained), config)
            targets[name] = load_eval_features(params.features.dir, eval_list_path(params.data.splits_dir, folder),
                                               config, cache=cache)
        except (FeatureCacheError, DatasetError, FileNotFoundError) as error:
            raise MissingInputsError(
                f"transfer target {name!r} (transfer.targets) has no test features: {error}\n"
                "Add it to data.datasets and run `dvc repro features`, or directly:\n"
                f"  python -m stages.prepare --params params.yaml --dataset {name}\n"
                f"  python -m stages.features --params params.yaml --dataset {name}"
            ) from None
    return targets


def load_inputs(params: Params, triples: list[tuple[str, int, int]], targets: list[str] | None = None) -> SweepInputs:
    """Features for every (dataset, shots, seed), and test features of the transfer `targets`;
    MissingInputsError names the dvc stage to run.

    In online mode each carries its split's `TrainImages` (under data.root, made absolute) for the trial.
    """
    try:
        # On the driver's CPU: its fingerprint and preprocessing identify the cache; trials load their own.
        backbone = load_params_backbone(params, "cpu")
    except WeightsUnavailableError as error:
        raise MissingInputsError(str(error)) from None
    config = FeatureConfig.from_params(backbone, params.features)
    data_root = Path(params.data.root).resolve() if config.online else None
    by_dataset: dict[str, list[tuple[int, int]]] = {}
    for dataset, shots, seed in triples:
        by_dataset.setdefault(dataset, []).append((shots, seed))
    features: dict[str, FewShotFeatures] = {}
    fingerprints: dict[str, str] = {}
    bar = tqdm(total=len(triples), desc="loading features", leave=False, disable=len(triples) < 10)
    for dataset, pairs in by_dataset.items():
        folder = dataset_folder(dataset)
        shots_list = sorted({s for s, _ in pairs})
        seeds_list = sorted({s for _, s in pairs})
        try:
            cache = open_feature_cache(
                feature_cache_dir(params.features.dir, folder, backbone.arch, backbone.pretrained), config
            )
            fingerprints[dataset] = cache_fingerprint(cache)
            for shots, seed in pairs:
                split = split_path(params.data.splits_dir, folder, shots, seed)
                features[feature_key(dataset, shots, seed)] = load_fewshot_features(
                    params.features.dir, split, config, cache=cache, data_root=data_root,
                    num_workers=online_workers(params),
                )
                bar.update()
        except (FeatureCacheError, DatasetError, FileNotFoundError) as error:
            raise MissingInputsError(
                f"features for dataset {dataset!r} are missing or stale: {error}\n"
                + _fix_hint(params, dataset, shots_list, seeds_list)
            ) from None
    bar.close()
    for data in features.values():
        if data.train_images is not None:
            try:
                data.train_images.check()  # the driver at least must see the images the trials will read
            except FileNotFoundError as error:
                raise MissingInputsError(str(error)) from None
    total = sum(f.train.numel() + f.val.numel() + f.test.numel() for f in features.values()) * 4
    log.info("loaded %d feature sets (%.1f MiB) for %d dataset(s)", len(features), total / 2**20, len(by_dataset))
    return SweepInputs(backbone, features, fingerprints, load_targets(params, backbone, targets or []))

