"""Baselines stage: zero-shot CLIP and the linear probe on cached features, each an MLflow run, in one CSV.

For every trainable dataset in ``data.datasets`` (the ImageNet variants are test-only) and every
``data.shots`` x ``data.seeds`` split, on the feature caches the sweep uses:

* ``zero-shot``: CLIP with the dataset's hand-crafted CoOp prompt (e.g. "a photo of a {}, a type of pet.");
* ``zero-shot-ensemble``: the hand-crafted prompt plus CLIP's seven ImageNet ensemble templates;
* ``linear-probe``: logistic regression on the few-shot features, C chosen on the few-shot val split, once
  per protocol in ``baselines.linear_probe_protocols``: ``lpclip``, the official CoOp probe (``lpclip/``:
  the training images' test-transform features, not normalised; seven coarse C values then eight halving
  steps in log10 C), and ``grid``, ours (every cached augmented view, normalised; 13 C values).

Zero-shot methods do not depend on shots or seed: they get one row per dataset with ``shots = 0``. Rows
go to ``<out>/baselines.csv`` (columns like the sweep's trials.csv: method, protocol (linear probe only),
dataset, shots, seed, val_acc, test_acc, ...), written atomically; ``<out>`` defaults to ``baselines/``
beside ``sweep.results_dir``.
MLflow: one parent run "baselines" in ``tracking.experiment`` and a child run per row.

This module also holds what the domain-shift and report stages share with it: the stage's backbone and
feature configuration, the MLflow helpers, and fetching a trial's artifacts (learned context, nearest words).
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import os
import shutil
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from tqdm import tqdm

from pipeline.atomic import write_csv_atomic
from pipeline.data.datasets import DatasetError, resolve_name
from pipeline.data.fewshot import eval_list_path, read_eval_list, read_fewshot_split, split_path
from pipeline.engine.backbone import Backbone, WeightsUnavailableError, load_backbone, resolve_device
from pipeline.errors import UserError
from pipeline.features import (
    FeatureCache,
    FeatureCacheError,
    FeatureConfig,
    feature_cache_dir,
    load_fewshot_features,
    open_feature_cache,
)
from pipeline.params import Params, ParamsError, load_params
from pipeline.tracking import (
    PARENT_TAG,
    TrackingError,
    check_tracking_uri,
    get_or_create_experiment,
    git_commit,
    resolve_tracking_uri,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

METHODS = ("zero-shot", "zero-shot-ensemble", "linear-probe")
COLUMNS = ["method", "protocol", "dataset", "shots", "seed", "val_acc", "test_acc", "C", "views", "backbone",
           "mlflow_run_id"]
STAGE_TAG = "coop.stage"


class StageError(UserError, RuntimeError):
    """The stage cannot run: missing inputs or services; the message names the fix."""


# ------------------------------------------------------------------------------------- shared plumbing


def baselines_dir(params: Params) -> Path:
    """Home of baselines.csv and domain_shift.csv (report.baselines_dir)."""
    return Path(params.report.baselines_dir)


def dataset_folder(name: str) -> str:
    info = resolve_name(name)
    return info.name if info is not None else name


def stage_backbone(params: Params, device: str | None = None) -> Backbone:
    """params' backbone (the one the feature caches were built with), frozen, on `device` (train.device)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            backbone = load_backbone(params.backbone.arch, params.backbone.pretrained,
                                     device=device or resolve_device(params.train.device))
        except WeightsUnavailableError as error:
            raise StageError(str(error)) from None
    if backbone.pretrained is None:
        log.warning("backbone %s has RANDOM weights: accuracies are meaningless (demo/test setup)", backbone.arch)
    return backbone


def feature_config(params: Params, backbone: Backbone) -> FeatureConfig:
    # Online mode caches no train views: FewShotFeatures.train is then each image's test-transform view.
    return FeatureConfig.from_params(backbone, params.features)


def open_cache(params: Params, dataset: str, config: FeatureConfig) -> FeatureCache:
    folder = dataset_folder(dataset)
    try:
        return open_feature_cache(feature_cache_dir(params.features.dir, folder, config.arch, config.pretrained),
                                  config)
    except FeatureCacheError as error:
        raise StageError(f"{error}\nRun `dvc repro features` (or python -m stages.features --dataset {folder}).") from None


def is_test_only(params: Params, dataset: str) -> bool:
    """True for datasets without few-shot splits (ImageNet variants), judged by the prepare stage's test list."""
    path = eval_list_path(params.data.splits_dir, dataset_folder(dataset))
    try:
        return read_eval_list(path).test_only
    except FileNotFoundError:
        raise StageError(f"{path} is missing; run `dvc repro prepare` (python -m stages.prepare).") from None


def backbone_label(params: Params) -> str:
    return f"{params.backbone.arch}/{params.backbone.pretrained or 'random'}"


@dataclass
class StageRun:
    """A parent MLflow run for a non-sweep stage, with child runs for its results."""

    client: MlflowClient
    experiment_id: str
    run_id: str

    @classmethod
    def start(cls, params: Params, name: str, stage: str, run_params: dict[str, Any],
              tracking_uri: str | None = None) -> StageRun:
        uri = resolve_tracking_uri(tracking_uri, params.tracking.uri)
        try:
            check_tracking_uri(uri, timeout=params.tracking.check_timeout_s)
        except TrackingError as error:
            raise StageError(str(error)) from None
        client = MlflowClient(uri)
        experiment_id = get_or_create_experiment(client, params.tracking.experiment, uri)
        run = client.create_run(experiment_id, run_name=name,
                                tags={STAGE_TAG: stage, "git_commit": git_commit(), "backbone": backbone_label(params)})
        client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in sorted(run_params.items())])
        return cls(client, experiment_id, run.info.run_id)

    def child(self, name: str, run_params: dict[str, Any], metrics: dict[str, float | None],
              tags: dict[str, Any]) -> str:
        run = self.client.create_run(self.experiment_id, run_name=name,
                                     tags={PARENT_TAG: self.run_id, **{k: str(v) for k, v in tags.items()}})
        now = run.info.start_time
        self.client.log_batch(
            run.info.run_id,
            params=[Param(k, str(v)[:6000]) for k, v in sorted(run_params.items())],
            metrics=[Metric(k, float(v), now, 0) for k, v in sorted(metrics.items())
                     if v is not None and math.isfinite(v)],
        )
        self.client.set_terminated(run.info.run_id, "FINISHED")
        return run.info.run_id

    def finish(self, status: str, artifacts: Sequence[Path] = (), metrics: dict[str, float] | None = None) -> None:
        if metrics:
            now = self.client.get_run(self.run_id).info.start_time
            self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in sorted(metrics.items())
                                                        if math.isfinite(v)])
        for path in artifacts:
            if path.is_file():
                self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, status)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def trial_artifacts(row: dict[str, str], results_dir: Path, dest: Path, tracking_uri: str,
                    names: Sequence[str] = ("ctx.safetensors", "ctx.json", "nearest_words.json")) -> Path | None:
    """A folder holding the trial's artifacts `names`: ``<results_dir>/contexts/<trial_key>/`` when the sweep
    wrote one, else downloaded from the trial's MLflow run into ``dest/<trial_key>/``. None if unavailable."""
    key = row.get("trial_key", "")
    local = results_dir / "contexts" / key
    if key and all((local / n).is_file() for n in names):
        return local
    run_id = row.get("mlflow_run_id", "")
    if not run_id:
        return None
    target = dest / (key or run_id)
    if all((target / n).is_file() for n in names):
        return target
    target.mkdir(parents=True, exist_ok=True)
    # One progress bar per tiny file would drown the stage's own log.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    client = MlflowClient(tracking_uri)
    try:
        for name in names:
            client.download_artifacts(run_id, name, str(target))
    except Exception as error:  # MLflow raises several types for a missing run or artifact
        log.warning("trial %s: cannot fetch %s from MLflow run %s (%s)", key, ", ".join(names), run_id,
                    str(error)[:200])
        shutil.rmtree(target, ignore_errors=True)
        return None
    return target


def fmt(value: float | None) -> float | str:
    return round(value, 4) if value is not None and math.isfinite(value) else ""


# ------------------------------------------------------------------------------------------- baselines


def run_baselines(params: Params, out_dir: Path, methods: Sequence[str] = METHODS, probe_views: int | None = None,
                  tracking_uri: str | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Evaluate `methods` on every trainable dataset x shots x seed; write ``out_dir/baselines.csv``."""
    from pipeline.engine.baselines import (
        ensemble_accuracy,
        ensemble_templates,
        linear_probe,
        lpclip_linear_probe,
        zero_shot_accuracy,
    )

    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise StageError(f"unknown baseline method(s) {unknown}; choose from {', '.join(METHODS)}")
    datasets = [d for d in params.data.datasets if not is_test_only(params, d)]
    if not datasets:
        raise StageError("data.datasets lists only test-only datasets; baselines need few-shot splits")
    backbone = stage_backbone(params)
    config = feature_config(params, backbone)
    run = StageRun.start(params, "baselines", "baselines",
                         {"methods": ",".join(methods), "datasets": ",".join(datasets), "shots": params.data.shots,
                          "seeds": params.data.seeds, "backbone": backbone_label(params),
                          "probe_views": probe_views or params.features.views,
                          "linear_probe_protocols": ",".join(params.baselines.linear_probe_protocols)},
                         tracking_uri)
    probe_protocols = params.baselines.linear_probe_protocols if "linear-probe" in methods else []
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
                        data = load_fewshot_features(params.features.dir, split_file, config, cache=cache)
                    except (FileNotFoundError, DatasetError, FeatureCacheError) as error:
                        raise StageError(f"{dataset} {shots}-shot seed {seed}: {error}") from None
                    if first:  # zero-shot uses no training data: once per dataset (same test set)
                        first = False
                        zero_shot = {"zero-shot": lambda d=data: zero_shot_accuracy(backbone, d),
                                     "zero-shot-ensemble": lambda d=data: ensemble_accuracy(backbone, d)}
                        for method, evaluate in zero_shot.items():
                            if method not in methods:
                                continue
                            test = evaluate()
                            templates = (ensemble_templates(data.dataset, data.template) if "ensemble" in method
                                         else (data.template,))
                            rows.append(_row(run, params, method, "", folder, 0, 0, None, test, None, 0,
                                             {"templates": " | ".join(templates)}))
                    for protocol in probe_protocols:
                        if protocol == "lpclip":
                            result = lpclip_linear_probe(data, plain_train_features(cache, split_file, dataset))
                            search = result["search"]
                            views, extra = 0, {"train_features": "test transform, not normalised",
                                               "search_coarse": _pairs(search.coarse),
                                               "search_rounds": "; ".join(_pairs([(lc, la), (rc, ra)])
                                                                          for lc, la, rc, ra in search.rounds)}
                        else:
                            views = min(probe_views or data.train.shape[1], data.train.shape[1])
                            probe_data = data if views == data.train.shape[1] else _first_views(data, views)
                            result = linear_probe(probe_data, seed=seed)
                            plain = params.features.views in (1, "online")  # one test-transform view per image
                            extra = {"train_features": ("test transform" if plain else f"{views} augmented view(s)")
                                     + ", L2-normalised",
                                     "search_grid": _pairs(result["val_by_C"].items())}
                        rows.append(_row(run, params, "linear-probe", protocol, folder, shots, seed,
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


def plain_train_features(cache: FeatureCache, split_file: Path, dataset: str) -> torch.Tensor:
    """(N, D) test-transform features of a split's training images, in the split's order (the eval store)."""
    paths = [item.path for item in read_fewshot_split(split_file).train]
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


def _first_views(data: Any, views: int) -> Any:
    from dataclasses import replace

    return replace(data, train=data.train[:, :views])


def _row(run: StageRun, params: Params, method: str, protocol: str, dataset: str, shots: int, seed: int,
         val: float | None, test: float, c: float | None, views: int, extra: dict[str, Any]) -> dict[str, Any]:
    """One MLflow child run and its CSV row; `protocol` names the linear probe's protocol ("" otherwise)."""
    name = f"{method}{f' ({protocol})' if protocol else ''} {dataset}" + (f" {shots}shot seed{seed}" if shots else "")
    run_params = {"method": method, "dataset": dataset, "shots": shots, "seed": seed,
                  "backbone": backbone_label(params), **({"protocol": protocol} if protocol else {}),
                  **({"C": c} if c is not None else {}), **({"views": views} if views else {}), **extra}
    run_id = run.child(name, run_params, {"test_acc": test, "val_acc": val},
                       {STAGE_TAG: "baselines", "baseline.method": method, "dataset": dataset, "shots": shots,
                        "seed": seed, **({"baseline.protocol": protocol} if protocol else {})})
    return {"method": method, "protocol": protocol, "dataset": dataset, "shots": shots, "seed": seed,
            "val_acc": fmt(val), "test_acc": fmt(test), "C": "" if c is None else f"{c:g}", "views": views or "",
            "backbone": backbone_label(params), "mlflow_run_id": run_id}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline.baselines_run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    parser.add_argument("--out", type=Path,
                        help="folder for baselines.csv (default: report.baselines_dir)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help="which baselines to run (default: all three)")
    parser.add_argument("--probe-views", type=int, metavar="V",
                        help="cached views per training image the `grid` linear probe trains on (default: all "
                        "features.views; 1 keeps ImageNet-sized probes tractable on a CPU); lpclip uses none")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else tracking.uri)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        params = load_params(args.params)
        run_baselines(params, args.out or baselines_dir(params), args.methods, args.probe_views, args.tracking_uri,
                      progress=not args.no_progress)
    except (ParamsError, StageError, DatasetError) as error:
        log.error("%s", error)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
