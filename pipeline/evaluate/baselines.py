"""The baselines stage's library: zero-shot CLIP and the linear probe on cached features, in baselines.csv.

For every trainable dataset in ``data.datasets`` (the ImageNet variants are test-only) and every
``data.shots`` x ``data.seeds`` split, on the feature caches the sweep uses:

* ``zero-shot``: CLIP with the dataset's hand-crafted CoOp prompt (e.g. "a photo of a {}, a type of pet.");
* ``zero-shot-ensemble``: CLIP's seven ImageNet ensemble templates, plus the hand-crafted prompt on every
  dataset but ImageNet itself (as the official ZeroshotCLIP2; `zero_shot.ensemble_templates`);
* ``linear-probe``: logistic regression on the few-shot features, C chosen on the few-shot val split, once
  per protocol in ``baselines.linear_probe_protocols``: ``lpclip``, the official CoOp probe (``lpclip/``:
  the training images' test-transform features, not normalised; seven coarse C values then eight halving
  steps in log10 C), and ``grid``, ours (every cached augmented view, normalised; 13 C values).

Zero-shot methods do not depend on shots or seed: they get one row per dataset with ``shots = 0``; zero-shot
CLIP also gets base-to-new's two rows (``protocol`` base / new: the base classes' test images with the base
names, the new classes' with the new names; the CLIP row of CoCoOp's Table 1). Rows
go to ``<out>/baselines.csv`` (columns like the sweep's trials.csv: method, protocol (linear probe only),
dataset, shots, seed, val_acc, test_acc, ...), written atomically. MLflow: one parent run "baselines" in
``tracking.experiment`` and a child run per row.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pipeline.atomic import write_csv_atomic
from pipeline.data.datasets import DatasetError, dataset_folder
from pipeline.data.fewshot import FewShotSplit, read_fewshot_split, split_path
from pipeline.engine.backbone import load_params_backbone, resolve_device
from pipeline.engine.inputs import split_base_new
from pipeline.evaluate.inputs import StageError, is_test_only, open_cache
from pipeline.evaluate.linear_probe import grid_linear_probe, lpclip_linear_probe
from pipeline.evaluate.methods import BASE_CLASSES, ENSEMBLE, METHODS, NEW_CLASSES, PROBE, ZERO_SHOT
from pipeline.evaluate.zero_shot import ensemble_accuracy, ensemble_templates, zero_shot_accuracy
from pipeline.features.assemble import load_fewshot_features
from pipeline.features.cache import FeatureCache, FeatureCacheError, FeatureConfig
from pipeline.params import ONLINE_VIEWS, Params
from pipeline.tables import csv_number
from pipeline.tracking import STAGE_TAG, StageRun, backbone_label

log = logging.getLogger(__name__)

COLUMNS = ["method", "protocol", "dataset", "shots", "seed", "val_acc", "test_acc", "C", "views", "backbone",
           "mlflow_run_id"]


def run_baselines(params: Params, out_dir: Path, methods: Sequence[str] = METHODS, probe_views: int | None = None,
                  tracking_uri: str | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Evaluate `methods` on every trainable dataset x shots x seed; write ``out_dir/baselines.csv``."""
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise StageError(f"unknown baseline method(s) {unknown}; choose from {', '.join(METHODS)}")
    datasets = [d for d in params.data.datasets if not is_test_only(params, d)]
    if not datasets:
        raise StageError("data.datasets lists only test-only datasets; baselines need few-shot splits")
    backbone = load_params_backbone(params, resolve_device(params.train.device))
    # Online mode caches no train views: FewShotFeatures.train is then each image's test-transform view.
    config = FeatureConfig.from_params(backbone, params.features)
    label = backbone_label(params.backbone.arch, params.backbone.pretrained)
    run = StageRun.start(params, "baselines", "baselines",
                         {"methods": ",".join(methods), "datasets": ",".join(datasets), "shots": params.data.shots,
                          "seeds": params.data.seeds, "backbone": label,
                          "probe_views": probe_views or params.features.views,
                          "linear_probe_protocols": ",".join(params.baselines.linear_probe_protocols)},
                         tracking_uri)
    probe_protocols = params.baselines.linear_probe_protocols if PROBE in methods else []
    rows: list[dict[str, Any]] = []
    try:
        jobs = [(d, s, seed) for d in datasets for s in params.data.shots for seed in params.data.seeds]
        bar = tqdm(total=len(jobs), desc="baselines", unit="split", disable=not progress)
        for dataset in datasets:
            folder = dataset_folder(dataset)
            cache = open_cache(params, dataset, config)
            first = True
            for shots in params.data.shots:
                for seed in params.data.seeds:
                    split_file = split_path(params.data.splits_dir, folder, shots, seed)
                    try:
                        split = read_fewshot_split(split_file)
                        data = load_fewshot_features(params.features.dir, split_file, config, cache=cache, split=split)
                    except (FileNotFoundError, DatasetError, FeatureCacheError) as error:
                        raise StageError(f"{dataset} {shots}-shot seed {seed}: {error}") from None
                    if first:  # zero-shot uses no training data: once per dataset (same test set)
                        first = False
                        zero_shot = {ZERO_SHOT: lambda d=data: zero_shot_accuracy(backbone, d),
                                     ENSEMBLE: lambda d=data: ensemble_accuracy(backbone, d)}
                        for method, evaluate in zero_shot.items():
                            if method not in methods:
                                continue
                            test = evaluate()
                            templates = (ensemble_templates(data.dataset, data.template) if method == ENSEMBLE
                                         else (data.template,))
                            rows.append(_row(run, label, method, "", folder, 0, 0, None, test, None, 0,
                                             {"templates": " | ".join(templates)}))
                        if ZERO_SHOT in methods and len(data.classnames) >= 2:
                            base, new = split_base_new(data)
                            for half, part in ((BASE_CLASSES, base), (NEW_CLASSES, new)):
                                rows.append(_row(run, label, ZERO_SHOT, half, folder, 0, 0, None,
                                                 zero_shot_accuracy(backbone, part), None, 0,
                                                 {"templates": data.template, "classes": len(part.classnames)}))
                    for protocol in probe_protocols:
                        if protocol == "lpclip":
                            result = lpclip_linear_probe(data, plain_train_features(cache, split, dataset))
                            search = result["search"]
                            views, extra = 0, {"train_features": "test transform, not normalised",
                                               "search_coarse": _pairs(search.coarse),
                                               "search_rounds": "; ".join(_pairs([(lc, la), (rc, ra)])
                                                                          for lc, la, rc, ra in search.rounds)}
                        else:
                            views = min(probe_views or data.train.shape[1], data.train.shape[1])
                            probe_data = (data if views == data.train.shape[1]
                                          else dataclasses.replace(data, train=data.train[:, :views]))
                            result = grid_linear_probe(probe_data, seed=seed)
                            plain = params.features.views in (1, ONLINE_VIEWS)  # one test-transform view per image
                            extra = {"train_features": ("test transform" if plain else f"{views} augmented view(s)")
                                     + ", L2-normalised",
                                     "search_grid": _pairs(result["val_by_C"].items())}
                        rows.append(_row(run, label, PROBE, protocol, folder, shots, seed,
                                         result["val_acc"], result["test_acc"], result["C"], views, extra))
                    bar.update()
        bar.close()
        path = out_dir / "baselines.csv"
        write_csv_atomic(path, COLUMNS, rows)
        run.finish("FINISHED", [path], {"rows": len(rows)})
    except BaseException:
        run.finish("FAILED")
        raise
    log.info("baselines: %d rows -> %s", len(rows), out_dir / "baselines.csv")
    return rows


def plain_train_features(cache: FeatureCache, split: FewShotSplit, dataset: str) -> torch.Tensor:
    """(N, D) test-transform features of a split's training images, in the split's order (the eval store)."""
    paths = [item.path for item in split.train]
    try:
        return cache.gather("eval", paths)
    except FeatureCacheError as error:
        raise StageError(
            f"{dataset}: the lpclip linear probe trains on the training images' test-transform features, which "
            f"this cache lacks (caches built before they were added to it): rerun `dvc repro features` (or "
            f"python -m stages.features --dataset {dataset_folder(dataset)}), or drop lpclip from "
            f"baselines.linear_probe_protocols. ({error})") from None


def _pairs(items: Any) -> str:
    """(C, val accuracy) pairs as one MLflow parameter: "C:acc, C:acc, ..."."""
    return ", ".join(f"{c:g}:{acc:.2f}" for c, acc in items)


def _row(run: StageRun, backbone: str, method: str, protocol: str, dataset: str, shots: int, seed: int,
         val: float | None, test: float, c: float | None, views: int, extra: dict[str, Any]) -> dict[str, Any]:
    """One MLflow child run and its CSV row; `protocol` names the linear probe's protocol, or zero-shot's class
    half (base/new), or is ""."""
    name = f"{method}{f' ({protocol})' if protocol else ''} {dataset}" + (f" {shots}shot seed{seed}" if shots else "")
    run_params = {"method": method, "dataset": dataset, "shots": shots, "seed": seed,
                  "backbone": backbone, **({"protocol": protocol} if protocol else {}),
                  **({"C": c} if c is not None else {}), **({"views": views} if views else {}), **extra}
    run_id = run.child(name, run_params, {"test_acc": test, "val_acc": val},
                       {STAGE_TAG: "baselines", "baseline.method": method, "dataset": dataset, "shots": shots,
                        "seed": seed, **({"baseline.protocol": protocol} if protocol else {})})
    return {"method": method, "protocol": protocol, "dataset": dataset, "shots": shots, "seed": seed,
            "val_acc": csv_number(val), "test_acc": csv_number(test), "C": "" if c is None else f"{c:g}",
            "views": views or "", "backbone": backbone, "mlflow_run_id": run_id}
