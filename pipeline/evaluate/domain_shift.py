"""The domain-shift stage's library: prompts learned on a source dataset, evaluated on its shifted test sets.

``domain_shift.source`` (ImageNet by default) is the dataset the prompts were learned on and
``domain_shift.targets`` (by default ImageNet-V2, -Sketch, -A, -R) its shifted test sets; those of them that
``data.datasets`` lists are evaluated. For every finished source trial of the sweep at the largest shot count
(16 in the paper; ``shots`` picks another) that trained on all the source's classes (protocol fewshot or xd;
base2new trials learned half of them), the learned model of its method (CoOp, CoCoOp, KgCoOp) is evaluated
on the source's test set and on each target, beside zero-shot CLIP (hand-crafted prompt, and the prompt
ensemble) on each.

A target holds the source's classes or a subset of them. ImageNet-A and -R cover 200 of the 1000 classes:
their ``imagenet_labels`` say which ImageNet class each of their classes is. A target without such a map
(a shifted set of the synthetic world, a user's own) is matched by class name. Either way a class-specific
context contributes exactly those classes' rows, and a unified context (CoCoOp's always is) is run over the
target's class names (the same classifier restricted to the subset).

Writes ``<out>/domain_shift.csv`` (one row per method x trial x target; atomically) and logs one MLflow
run "domain-shift" with the CSV and per-method, per-target means.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pipeline.atomic import write_csv_atomic
from pipeline.data.datasets import dataset_folder
from pipeline.data.fewshot import EvalList, eval_list_path, read_eval_list
from pipeline.data.protocols import FEWSHOT, XD
from pipeline.engine.backbone import Backbone, load_params_backbone, resolve_device
from pipeline.engine.context import ContextMeta, load_learned
from pipeline.engine.inputs import EvalFeatures
from pipeline.engine.methods import learned_accuracy
from pipeline.evaluate.inputs import StageError, open_cache
from pipeline.evaluate.methods import ENSEMBLE, LEARNED_METHOD_NAMES, ZERO_SHOT, learned_method_name
from pipeline.evaluate.zero_shot import ensemble_accuracy, zero_shot_accuracy
from pipeline.features.assemble import load_eval_features
from pipeline.features.cache import FeatureConfig
from pipeline.params import Params
from pipeline.tables import csv_number, read_csv_rows
from pipeline.tracking import StageRun, backbone_label, resolve_tracking_uri, trial_artifacts

log = logging.getLogger(__name__)

COLUMNS = ["method", "config", "n_ctx", "ctx_init", "csc", "class_token_position", "source", "target", "shots",
           "seed", "test_acc", "trial_key", "backbone", "protocol"]
# The protocols whose trials learned every class of their dataset: domain-shift sources (base2new's learned half).
SOURCE_PROTOCOLS = (FEWSHOT, XD)


def subset_rows(source_labels: Sequence[int] | None, target: EvalList) -> list[int]:
    """For each target class, the row of the source's class list holding the same ImageNet class.

    Classes are matched by ImageNet label, never by name: CLIP's ImageNet list has two classes called
    'missile' and two called 'sunglasses'.
    """
    if target.imagenet_labels is None:
        raise StageError(f"{target.dataset} has no ImageNet label map; it is not an ImageNet variant")
    labels = list(source_labels) if source_labels is not None else list(range(1000))
    row_of = {label: row for row, label in enumerate(labels)}
    missing = [f"{target.classnames[i]!r} (ImageNet label {lab})" for i, lab in enumerate(target.imagenet_labels)
               if lab not in row_of]
    if missing:
        raise StageError(
            f"{target.dataset}: classes {', '.join(missing[:5])} are not among the {len(labels)} ImageNet classes the "
            "contexts were trained on"
        )
    return [row_of[label] for label in target.imagenet_labels]


def name_rows(source_classnames: Sequence[str], target: EvalList) -> list[int]:
    """For each target class, the row of the source's class list with the same name (a target without an
    ImageNet label map: the source's own classes, or a subset of them)."""
    if list(target.classnames) == list(source_classnames):
        return list(range(len(source_classnames)))  # the source's list itself, names shared by labels included
    rows_of: dict[str, list[int]] = {}
    for row, name in enumerate(source_classnames):
        rows_of.setdefault(name, []).append(row)
    missing = [repr(name) for name in target.classnames if name not in rows_of]
    if missing:
        raise StageError(
            f"{target.dataset}: classes {', '.join(missing[:5])} are not among the {len(source_classnames)} classes "
            "the contexts were trained on; a shifted test set must hold the source's classes (or a subset)"
        )
    shared = [repr(name) for name in target.classnames if len(rows_of[name]) > 1]
    if shared:
        raise StageError(f"{target.dataset}: classes {', '.join(shared[:5])} name several source classes; "
                         "give the target the source's whole class list in the source's order")
    return [rows_of[name][0] for name in target.classnames]


def target_rows(source: EvalList, target: EvalList) -> list[int]:
    """The source rows of the target's classes: by ImageNet label where both have a label map, else by name."""
    if target.imagenet_labels is not None and source.imagenet_labels is not None:
        return subset_rows(source.imagenet_labels, target)
    return name_rows(source.classnames, target)


def restrict(ctx: torch.Tensor, meta: ContextMeta, rows: list[int], classnames: list[str]) -> tuple[torch.Tensor,
                                                                                                      ContextMeta]:
    """The context for a class subset: a CSC context keeps the subset's rows, a unified one is shared."""
    sub = ctx[rows] if meta.csc else ctx
    return sub, dataclasses.replace(meta, classnames=list(classnames))


def restricted_accuracy(backbone: Backbone, tensors: dict[str, torch.Tensor], meta: ContextMeta, rows: list[int],
                        target: EvalFeatures) -> float:
    """Test accuracy (%) on `target` of a saved model of any method (`context.load_learned`'s tensors and
    metadata) restricted to the source rows `rows`: a CSC context keeps those rows; a unified one (and CoCoOp's
    meta-network, which is the same for every class) is used as it is over the target's class names."""
    ctx, sub_meta = restrict(tensors["ctx"], meta, rows, target.classnames)
    return learned_accuracy(backbone, {**tensors, "ctx": ctx}, sub_meta, target)


def context_accuracy(backbone: Backbone, ctx: torch.Tensor, meta: ContextMeta, rows: list[int],
                     target: EvalFeatures) -> float:
    """Test accuracy (%) on `target` of a learned context (CoOp's, KgCoOp's) restricted to the source rows `rows`."""
    return restricted_accuracy(backbone, {"ctx": ctx}, meta, rows, target)


def trial_protocol(trial: dict[str, str]) -> str:
    """A trials.csv row's protocol; sweeps from before protocols were recorded ran few-shot trials."""
    return trial.get("protocol") or FEWSHOT


def shift_targets(params: Params) -> list[str]:
    """The domain_shift.targets that data.datasets lists, as prepared folder names, in data.datasets' order."""
    source = dataset_folder(params.domain_shift.source)
    wanted = {dataset_folder(t) for t in params.domain_shift.targets} - {source}
    listed = list(dict.fromkeys(dataset_folder(d) for d in params.data.datasets))
    return [folder for folder in listed if folder in wanted]


def read_eval(params: Params, dataset: str) -> EvalList:
    """The prepared test list of `dataset`; StageError says to run prepare when it is missing."""
    try:
        return read_eval_list(eval_list_path(params.data.splits_dir, dataset))
    except FileNotFoundError as error:
        raise StageError(str(error)) from None


def run_domain_shift(params: Params, out_dir: Path, shots: int | None = None, tracking_uri: str | None = None,
                     progress: bool = True) -> list[dict[str, Any]]:
    """Evaluate the sweep's source contexts and zero-shot CLIP on the shifted test sets; write the CSV."""
    results_dir = Path(params.sweep.results_dir)
    trials_path = results_dir / "trials.csv"
    if not trials_path.is_file():
        raise StageError(f"{trials_path} is missing; run the sweep first (dvc repro sweep)")
    source = dataset_folder(params.domain_shift.source)
    targets = shift_targets(params)
    finished = [r for r in read_csv_rows(trials_path)
                if dataset_folder(r["dataset"]) == source and r["state"] == "FINISHED"]
    trials = [r for r in finished if trial_protocol(r) in SOURCE_PROTOCOLS]
    if len(trials) < len(finished):
        log.info("domain shift: %d %s trial(s) of protocol %s skipped (they learned the base half of the classes)",
                 len(finished) - len(trials), source,
                 ", ".join(sorted({trial_protocol(r) for r in finished} - set(SOURCE_PROTOCOLS))))
    why_not = ""
    if source not in [dataset_folder(d) for d in params.data.datasets]:
        why_not = f"data.datasets has no {source} (domain_shift.source)"
    elif not targets:
        why_not = (f"data.datasets lists none of domain_shift.targets "
                   f"({', '.join(params.domain_shift.targets)})")
    elif not trials:
        why_not = (f"{trials_path} has no FINISHED {source} trial of protocol {' or '.join(SOURCE_PROTOCOLS)}"
                   if finished else f"{trials_path} has no FINISHED {source} trial")
    if why_not:
        # Not an error: a pipeline without the source (the demo) has no domain-shift experiment to run.
        log.warning("domain shift: nothing to evaluate (%s); writing an empty table", why_not)
        write_csv_atomic(out_dir / "domain_shift.csv", COLUMNS, [])
        return []
    chosen = shots if shots is not None else max(int(r["shots"]) for r in trials)
    trials = [r for r in trials if int(r["shots"]) == chosen]
    if not trials:
        raise StageError(f"no FINISHED {source} trial with {chosen} shots in {trials_path}")

    lists = {name: read_eval(params, name) for name in [source, *targets]}
    source_list = lists[source]
    rows_of = {name: list(range(len(source_list.classnames))) if name == source
               else target_rows(source_list, listed) for name, listed in lists.items()}
    uri = resolve_tracking_uri(tracking_uri, params.tracking.uri)
    backbone = load_params_backbone(params, resolve_device(params.train.device))
    config = FeatureConfig.from_params(backbone, params.features)
    label = backbone_label(params.backbone.arch, params.backbone.pretrained)
    evaluations = {name: load_eval_features(params.features.dir, eval_list_path(params.data.splits_dir, name), config,
                                            cache=open_cache(params, name, config))
                   for name in lists}
    run = StageRun.start(params, "domain-shift", "domain_shift",
                         {"source": source, "targets": ",".join(targets), "shots": chosen,
                          "contexts": len(trials), "backbone": label}, tracking_uri)
    out: list[dict[str, Any]] = []
    try:
        for method, accuracy in ((ZERO_SHOT, zero_shot_accuracy), (ENSEMBLE, ensemble_accuracy)):
            for name, target in evaluations.items():
                out.append(_row(method, None, source, name, 0, 0, accuracy(backbone, target), label))
        with tempfile.TemporaryDirectory(prefix="coop-domain-shift-") as tmp:
            for trial in tqdm(trials, desc=f"{source} models", disable=not progress):
                folder = trial_artifacts(trial, results_dir, Path(tmp), uri, names=("ctx.safetensors", "ctx.json"))
                if folder is None:
                    log.warning("trial %s: no learned model found; skipped", trial["trial_key"])
                    continue
                tensors, meta = load_learned(folder / "ctx.safetensors")
                if meta.classnames != source_list.classnames:
                    raise StageError(f"trial {trial['trial_key']}: its model's classes differ from the {source} "
                                     "test list; rerun prepare/sweep with the same data")
                method = learned_method_name(meta.method)
                for name, target in evaluations.items():
                    acc = restricted_accuracy(backbone, tensors, meta, rows_of[name], target)
                    out.append(_row(method, trial, source, name, chosen, int(trial["seed"]), acc, label))
        path = out_dir / "domain_shift.csv"
        write_csv_atomic(path, COLUMNS, out)
        means = {}
        for method_id, method in LEARNED_METHOD_NAMES.items():
            for name in evaluations:
                values = [float(r["test_acc"]) for r in out if r["method"] == method and r["target"] == name]
                if values:
                    means[f"{method_id}_mean_test_acc.{name}"] = sum(values) / len(values)
        run.finish("FINISHED", [path], means)
    except BaseException:
        run.finish("FAILED")
        raise
    log.info("domain shift: %d rows (%d models x %d targets + zero-shot) -> %s", len(out), len(trials),
             len(evaluations), out_dir / "domain_shift.csv")
    return out


def _row(method: str, trial: dict[str, str] | None, source: str, target: str, shots: int, seed: int, acc: float,
         backbone: str) -> dict[str, Any]:
    config = {}
    if trial is not None:
        config = {"n_ctx": int(trial["n_ctx"]), "ctx_init": trial["ctx_init"], "csc": trial["csc"] == "True",
                  "class_token_position": trial["class_token_position"]}
    return {"method": method, "config": trial.get("config", "") if trial else "", **config, "source": source,
            "target": target, "shots": shots, "seed": seed, "test_acc": csv_number(acc),
            "trial_key": trial["trial_key"] if trial else "", "backbone": backbone,
            "protocol": trial_protocol(trial) if trial else ""}
