"""A bundle trial: one Ray trial trains B CoOp configurations in one fused step, each with its own MLflow run.

The members (formed by plan.form_bundles) share a dataset, protocol, shot count, epochs, precision and batch
size; engine/bundle.py trains them as each would train alone. Each member keeps what a trial of its own has:
its MLflow child run (tagged with the bundle's Ray trial), curves, artifacts and status. A NaN loss fails that
member alone; ASHA stops a member, not the bundle: Tune's scheduler sees whole trials, so with bundles the
sweep asks MemberRungs (ASHA's rule, shared by every trial through a Ray actor) at each validation. A resumed
bundle trains only its members that did not finish. Tune gets one report per validated epoch holding every
member's latest result under MEMBERS, which is what the sweep's records read.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import ray
import torch
from ray import tune

from pipeline.engine.bundle import BundleMember, train_bundle
from pipeline.engine.train import EpochMetrics
from pipeline.sweep.plan import BUNDLE, MEMBERS, members_of
from pipeline.sweep.space import complete, trial_key
from pipeline.sweep.trial import (
    TrialSettings,
    close_run,
    completed,
    finish_trial,
    interrupted_reason,
    keeps_training,
    log_epoch,
    open_trial_run,
    reused_result,
    run_trial,
    stopped_reason,
    train_config,
    trial_backbone,
    trial_inputs,
    trial_prompt,
)
from pipeline.tracking import TrialRun, bound_http_retries

log = logging.getLogger(__name__)

BUNDLE_TAG = "sweep.bundle"  # MLflow tag of a member's run: the Ray trial of its bundle
RUNNING, FINISHED, STOPPED, FAILED = "RUNNING", "FINISHED", "STOPPED", "FAILED"


def run_sweep_trial(config: dict[str, Any], settings: TrialSettings, features: dict[str, ray.ObjectRef],
                    targets: dict[str, ray.ObjectRef] | None = None, rungs: Any = None) -> None:
    """The sweep's Ray Tune trainable: a bundle's members together, or one configuration alone."""
    if BUNDLE in config:
        run_bundle(config, settings, features, targets, rungs)
    else:
        run_trial(config, settings, features, targets, rungs)


def bundle_report(results: dict[str, dict[str, Any]], epoch: int) -> dict[str, Any]:
    """Tune's view of the bundle: the epoch, its best member's val_acc (Tune wants the metric) and every member."""
    vals = [r["val_acc"] for r in results.values()
            if isinstance(r.get("val_acc"), float) and math.isfinite(r["val_acc"])]
    return {"epoch": epoch, "val_acc": max(vals, default=float("nan")),
            MEMBERS: {key: dict(r) for key, r in results.items()}}


def run_bundle(config: dict[str, Any], settings: TrialSettings, features: dict[str, ray.ObjectRef],
               targets: dict[str, ray.ObjectRef] | None = None, rungs: Any = None) -> None:
    """Train the bundle's members that are not finished yet, each into its own run; see the module docstring."""
    members = [complete(c) for c in members_of(config)]
    keys = [trial_key(c) for c in members]
    epochs = int(members[0]["epochs"])
    torch.set_num_threads(max(1, int(settings.cpus_per_trial)))
    bound_http_retries()
    tags = {BUNDLE_TAG: tune.get_context().get_trial_id() or "", "sweep.bundle_size": len(members)}
    results: dict[str, dict[str, Any]] = {}
    runs: dict[int, TrialRun] = {}  # member index -> its open run (members still to train)
    for i, (member, key) in enumerate(zip(members, keys, strict=True)):
        run, finished = open_trial_run(member, settings, key, tags)
        if finished is not None:  # resumed: finished before the interruption, not trained again
            results[key] = reused_result(member, key, finished) | {"state": FINISHED}
        else:
            assert run is not None
            runs[i] = run
            results[key] = {"state": RUNNING, "epoch": 0, "trial_key": key, "mlflow_run_id": run.run_id}
    todo = sorted(runs)  # bundle position j trains member todo[j]
    last_epoch = 0
    validated: set[int] = set()  # epochs at which a member was validated
    try:
        if todo:
            backbone = trial_backbone(settings)
            inputs = [trial_inputs(members[i], features, targets) for i in todo]
            cfgs = [train_config(settings.train, members[i]) for i in todo]
            bundle = [BundleMember(data, trial_prompt(members[i]), cfg, epochs)
                      for i, (data, _, _), cfg in zip(todo, inputs, cfgs, strict=True)]

            def on_epoch(j: int, m: EpochMetrics) -> bool:
                i = todo[j]
                key, run = keys[i], runs[i]
                log_epoch(run, m)
                results[key].update(epoch=m.epoch, loss=m.loss, train_acc=m.train_acc, lr=m.lr)
                if m.val_acc is None:
                    return True
                results[key]["val_acc"] = m.val_acc
                validated.add(m.epoch)
                # Asked at the last epoch too (the answer cannot stop it then), as Ray's ASHA sees a final result.
                if not keeps_training(rungs, key, m.epoch, m.val_acc) and m.epoch < epochs:
                    reason = stopped_reason(m.epoch, epochs, m.val_acc)
                    close_run(runs.pop(i), "KILLED", reason)
                    results[key].update(state=STOPPED, reason=reason)
                    return False
                return True

            def after_epoch(epoch: int) -> None:
                nonlocal last_epoch
                last_epoch = epoch
                if epoch < epochs and epoch in validated:  # as a trial alone reports: at its validations
                    tune.report(bundle_report(results, epoch))

            outcomes = train_bundle(backbone, bundle, on_epoch, progress=False, after_epoch=after_epoch)
            for j, outcome in enumerate(outcomes):
                i = todo[j]
                key = keys[i]
                if outcome.stopped:
                    continue  # closed when ASHA stopped it
                run = runs.pop(i)
                try:
                    if outcome.error is not None:
                        raise outcome.error
                    assert outcome.result is not None
                    data, new_classes, transfer = inputs[j]
                    results[key] = finish_trial(run, members[i], settings, backbone, data, outcome.result, cfgs[j],
                                                key, new_classes, transfer) | {"state": FINISHED}
                    completed(rungs, key)
                except Exception as error:  # this member alone failed: its run says why, the others go on
                    reason = f"{type(error).__name__}: {error}"
                    log.warning("bundle member %s failed: %s", key, reason)
                    close_run(run, "FAILED", reason)
                    results[key].update(state=FAILED, reason=reason)
    except Exception as error:
        for run in runs.values():
            close_run(run, "FAILED", f"{type(error).__name__}: {error}")
        raise
    except BaseException as error:
        for run in runs.values():
            close_run(run, "KILLED", interrupted_reason(error, last_epoch, epochs))
        raise
    tune.report(bundle_report(results, epochs))
