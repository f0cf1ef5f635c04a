"""One sweep trial, run by Ray Tune in a worker process: train a method's prompt under a protocol, track it in MLflow.

The trial trains its method (CoOp, CoCoOp, KgCoOp) under its protocol: few-shot on all classes; base-to-new
(trains on the base half of the classes: val and test accuracy are the base classes', `new_acc` the new
classes' test accuracy with their names, `h_acc` their harmonic mean); cross-dataset transfer (trains as
few-shot, then `transfer` holds the test accuracy on every transfer target with its class names).
The trial gets its few-shot features from Ray's object store (no shared filesystem needed), loads the
(seeded) backbone once per worker process, and logs straight to the tracking URI into its own child run.
In online mode (features.views: online) it also reads the training images, cropped afresh every epoch,
from data.root: every worker must see that folder at the same path (e.g. a shared filesystem).
Validation accuracy goes to Tune at every evaluation (what ASHA and TPE act on); the final report carries
test accuracy too, which the sweep records but never selects on.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import socket
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from pipeline.data.protocols import BASE2NEW, XD, harmonic_mean
from pipeline.engine.backbone import Backbone, load_backbone, resolve_device
from pipeline.engine.context import ContextMeta, save_learned
from pipeline.engine.inputs import EvalFeatures, FewShotFeatures, split_base_new
from pipeline.engine.interpret import format_entry, nearest_word_entries
from pipeline.engine.methods import METHOD_HYPERPARAMETERS, MethodConfig, learned_accuracy, train_method
from pipeline.engine.prompt import PromptConfig, resolve_n_ctx
from pipeline.engine.train import EpochMetrics, TrainConfig, TrainResult
from pipeline.params import FeatureParams, TrackingParams, TrainParams
from pipeline.sweep.plan import feature_key
from pipeline.sweep.space import complete, config_label, trial_key
from pipeline.tracking import (
    GPU_TAG,
    NODE_TAG,
    RAY_TRIAL_TAG,
    SWEEP_TAG,
    OutageGuard,
    TrialRun,
    backbone_label,
    bound_http_retries,
)

log = logging.getLogger(__name__)


# TrainConfig fields each trial takes from its own configuration; every other one comes from train.* in params
# (and train.batch_size unless the configuration's batch_size is set).
TRIAL_TRAIN_KEYS = ("lr", "epochs", "precision", "seed")
TRANSFER_METRIC = "xd_acc."  # MLflow metric prefix of a transfer target's test accuracy


@dataclass(frozen=True)
class TrialSettings:
    """Everything a trial needs besides its configuration and features; the same for every trial."""

    sweep_name: str
    arch: str
    pretrained: str | None
    backbone_fingerprint: str
    train: TrainParams  # train.* of params; the trial's configuration overrides TRIAL_TRAIN_KEYS
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    git_commit: str
    cache_fingerprints: dict[str, str]  # dataset -> fingerprint of its feature cache
    feature_settings: dict[str, Any]  # recorded_feature_settings(params.features)
    nearest_words: int = 3
    cpus_per_trial: float = 1.0
    tracking_outage_limit_s: float = TrackingParams.outage_limit_s  # how long a tracking outage is ridden out


def recorded_feature_settings(features: FeatureParams) -> dict[str, Any]:
    """The features.* settings that shape a trial's inputs, as its MLflow params and config.json record them."""
    return {"views": features.views, "views_per_seed": features.views_per_seed, "dtype": features.dtype,
            "seed": features.seed, "online_workers": features.online_workers}


def shared_train_settings(train: TrainParams) -> dict[str, Any]:
    """The TrainConfig fields every trial of the sweep shares, as train.* in params gives them."""
    return {f.name: getattr(train, f.name) for f in dataclasses.fields(TrainConfig) if f.name not in TRIAL_TRAIN_KEYS}


def train_config(train: TrainParams, config: dict[str, Any]) -> TrainConfig:
    """The trial's TrainConfig: train.* from params, with the lr, epochs, precision, seed and (unless null)
    batch size of its configuration."""
    cfg = TrainConfig(**shared_train_settings(train), lr=config["lr"], epochs=int(config["epochs"]),
                      precision=config["precision"], seed=config["seed"])
    batch = config.get("batch_size")
    return cfg if batch is None else dataclasses.replace(cfg, batch_size=int(batch))


def method_config(config: dict[str, Any]) -> MethodConfig:
    """The trial's method with its own hyperparameters (the configuration holds null for the others')."""
    method = config.get("method", "coop")
    return MethodConfig(method, **{k: config[k] for k in METHOD_HYPERPARAMETERS[method]})



def run_name(config: dict[str, Any]) -> str:
    return f"{config['dataset']}-{config['shots']}shot-seed{config['seed']} {config_label(config)}"


def trial_params(config: dict[str, Any], settings: TrialSettings) -> dict[str, Any]:
    """Every setting that determines the trial's result, as logged to MLflow."""
    return {
        **{k: v for k, v in config.items() if v is not None},  # null: a key of another method, or a default below
        "n_ctx_effective": resolve_n_ctx(PromptConfig(config["n_ctx"], config["ctx_init"])),
        "batch_size_effective": config.get("batch_size") or settings.train.batch_size,
        **{f"train.{k}": v for k, v in sorted(shared_train_settings(settings.train).items())},
        **{f"features.{k}": v for k, v in sorted(settings.feature_settings.items())},
        "backbone.arch": settings.arch,
        "backbone.pretrained": settings.pretrained,
    }


def trial_tags(config: dict[str, Any], settings: TrialSettings, key: str, trial_id: str,
               node_ip: str) -> dict[str, Any]:
    return {
        SWEEP_TAG: settings.sweep_name,
        RAY_TRIAL_TAG: trial_id,
        NODE_TAG: node_ip,
        GPU_TAG: ",".join(str(g) for g in ray.get_gpu_ids()) or "none",  # shared GPUs show the same id
        "hostname": socket.gethostname(),
        "git_commit": settings.git_commit,
        "feature_cache": settings.cache_fingerprints.get(config["dataset"], "unknown"),
        "backbone": backbone_label(settings.arch, settings.pretrained),
        "backbone_fingerprint": settings.backbone_fingerprint,
        "dataset": config["dataset"],
        "shots": config["shots"],
        "seed": config["seed"],
        "method": config.get("method", "coop"),
        "protocol": config.get("protocol", "fewshot"),
        "config": config_label(config),
    }


def trial_device(setting: str) -> torch.device:
    """train.device as a torch device for this worker; Ray exposes only the GPUs it assigned the trial."""
    try:
        return resolve_device(setting)
    except ValueError:
        raise RuntimeError(
            f"train.device is {setting!r} but this trial sees no GPU (Ray assigned {ray.get_gpu_ids()}); "
            "set sweep.gpus_per_trial > 0 (fractions allowed) or train.device: auto"
        ) from None


@functools.lru_cache(maxsize=2)
def _backbone(arch: str, pretrained: str | None, device: str) -> Backbone:
    # One load per worker process: Ray reuses workers across trials (reuse_actors), the model is frozen.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random-weights warning was already shown by the driver
        return load_backbone(arch, pretrained, device=device)


def trial_prompt(config: dict[str, Any]) -> PromptConfig:
    return PromptConfig(config["n_ctx"], config["ctx_init"], config["csc"], config["class_token_position"])


def learned_meta(config: dict[str, Any], settings: TrialSettings, backbone: Backbone, data: FewShotFeatures,
                 result: TrainResult, key: str) -> ContextMeta:
    """ctx.json's metadata: what rebuilds the classifier (method, prompt, backbone, classes) and its origin."""
    prompt = trial_prompt(config)
    method = method_config(config)
    return ContextMeta(
        arch=settings.arch,
        pretrained=settings.pretrained,
        fingerprint=backbone.fingerprint,
        n_ctx=resolve_n_ctx(prompt),
        class_token_position=prompt.class_token_position,
        csc=prompt.csc,
        ctx_init=prompt.ctx_init,
        classnames=list(data.classnames),
        dataset=config["dataset"],
        shots=config["shots"],
        seed=config["seed"],
        val_acc=result.val_acc,
        test_acc=result.test_acc,
        extra={"trial_key": key, "sweep": settings.sweep_name, "lr": config["lr"], "epochs": config["epochs"],
               "protocol": config.get("protocol", "fewshot")},
        method=method.name,
        method_params=method.hyperparameters(),
    )


def write_artifacts(folder: Path, config: dict[str, Any], settings: TrialSettings, backbone: Backbone,
                    data: FewShotFeatures, result: TrainResult, train_cfg: TrainConfig, key: str,
                    evaluations: dict[str, Any] | None = None) -> None:
    """ctx.safetensors + ctx.json (what the method learned), the context's nearest words, the resolved config
    and (base-to-new, transfer) the further evaluations."""
    meta = learned_meta(config, settings, backbone, data, result, key)
    prompt = meta.prompt_config
    save_learned(folder / "ctx.safetensors", result.learned, meta)
    ctx = result.ctx

    # CSC rows are named by label and class name: ImageNet has two classes called 'missile'.
    entries = nearest_word_entries(ctx, backbone, data.classnames, k=settings.nearest_words)
    lines = [format_entry(entry) for entry in entries]
    # Words as text ("👑", "café"), not JSON escapes: MLflow's artifact viewer shows the file as it is.
    (folder / "nearest_words.json").write_text(
        json.dumps({"k": settings.nearest_words, "vectors": entries}, indent=2, ensure_ascii=False), encoding="utf-8")
    (folder / "nearest_words.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")

    resolved = {
        "trial_key": key,
        "sweep": settings.sweep_name,
        "config": config,
        "method": {"name": meta.method, **meta.method_params},
        "evaluations": evaluations or {},
        "prompt": asdict(prompt) | {"n_ctx_effective": meta.n_ctx},
        "train": train_cfg.to_dict(),
        "backbone": {"arch": settings.arch, "pretrained": settings.pretrained, "fingerprint": backbone.fingerprint},
        "features": {**settings.feature_settings, "cache": settings.cache_fingerprints.get(config["dataset"])},
        "device": str(backbone.device),
        "git_commit": settings.git_commit,
    }
    (folder / "config.json").write_text(json.dumps(resolved, indent=2, sort_keys=True))


def close_run(run: TrialRun, status: str, reason: str = "") -> None:
    try:
        run.close(status, reason)
    except Exception as error:  # the trial's own outcome matters more than bookkeeping
        log.error("could not mark MLflow run %s %s: %s", run.run_id, status, error)


def evaluate_protocol(config: dict[str, Any], backbone: Backbone, result: TrainResult, meta: ContextMeta,
                      new_classes: EvalFeatures | None, targets: dict[str, EvalFeatures]) -> dict[str, Any]:
    """The protocol's further test accuracies: base-to-new's new_acc and h_acc, transfer's per-target accuracy."""
    out: dict[str, Any] = {}
    protocol = config.get("protocol", "fewshot")
    if protocol == BASE2NEW and new_classes is not None:
        out["new_acc"] = learned_accuracy(backbone, result.learned, meta, new_classes)
        out["h_acc"] = harmonic_mean(result.test_acc, out["new_acc"])
    elif protocol == XD:
        out["transfer"] = {name: learned_accuracy(backbone, result.learned, meta, target)
                           for name, target in targets.items() if name != config["dataset"]}
    return out


def protocol_metrics(evaluations: dict[str, Any]) -> dict[str, float]:
    """`evaluate_protocol`'s results as flat MLflow metrics (transfer: ``xd_acc.<target>``)."""
    flat = {k: v for k, v in evaluations.items() if k != "transfer"}
    flat.update({f"{TRANSFER_METRIC}{name}": acc for name, acc in evaluations.get("transfer", {}).items()})
    return flat


def stored_evaluations(metrics: dict[str, float]) -> dict[str, Any]:
    """`protocol_metrics` read back from a finished MLflow run (a resumed sweep reuses them)."""
    out: dict[str, Any] = {k: metrics[k] for k in ("new_acc", "h_acc") if k in metrics}
    transfer = {k.removeprefix(TRANSFER_METRIC): v for k, v in metrics.items() if k.startswith(TRANSFER_METRIC)}
    if transfer:
        out["transfer"] = transfer
    return out


def open_trial_run(config: dict[str, Any], settings: TrialSettings, key: str,
                   extra_tags: dict[str, Any] | None = None) -> tuple[TrialRun | None, Any]:
    """The configuration's MLflow run for this attempt (opened as a child of the sweep's run, tagged with the Ray
    trial, node and GPU), or (None, the FINISHED run) when a resumed sweep already finished it."""
    # A tracking-server outage is ridden out by the guard (metrics held, training on) for up to
    # tracking.outage_limit_s, one that starts while the run opens included.
    server = OutageGuard(settings.tracking_uri, settings.tracking_outage_limit_s)
    trial_id = tune.get_context().get_trial_id() or ""
    params = trial_params(config, settings)
    tags = trial_tags(config, settings, key, trial_id, ray.util.get_node_ip_address()) | (extra_tags or {})
    run, finished = server.call("opening the trial's run", lambda: TrialRun.open(
        settings.tracking_uri, settings.experiment_id, settings.parent_run_id, key, run_name(config), params, tags))
    if run is not None:
        run.server = server
    return run, finished


def reused_result(config: dict[str, Any], key: str, finished: Any) -> dict[str, Any]:
    """What Tune gets for a configuration a resumed sweep finished before: its recorded results (no retraining)."""
    log.info("trial %s already FINISHED in MLflow run %s; not training it again", key, finished.info.run_id)
    metrics = finished.data.metrics
    return {"epoch": config["epochs"], "val_acc": metrics.get("val_acc", float("nan")),
            "test_acc": metrics.get("test_acc", float("nan")), "train_seconds": metrics.get("train_seconds", 0.0),
            **stored_evaluations(metrics), "trial_key": key, "mlflow_run_id": finished.info.run_id, "reused_run": 1}


def trial_backbone(settings: TrialSettings) -> Backbone:
    """This worker's frozen backbone, checked to be the one whose image features the driver cached."""
    backbone = _backbone(settings.arch, settings.pretrained, trial_device(settings.train.device))
    if backbone.fingerprint != settings.backbone_fingerprint:
        raise RuntimeError(
            f"this worker's backbone weights ({backbone.fingerprint}) differ from the driver's "
            f"({settings.backbone_fingerprint}) that encoded the features; give every node the same "
            f"{settings.arch} / {settings.pretrained} weights"
        )
    return backbone


def trial_inputs(config: dict[str, Any], features: dict[str, ray.ObjectRef],
                 targets: dict[str, ray.ObjectRef] | None) -> tuple[FewShotFeatures, EvalFeatures | None,
                                                                    dict[str, EvalFeatures]]:
    """The configuration's training features from Ray's object store, as its protocol uses them: (the classes it
    trains on, base-to-new's new classes or None, the transfer targets' test features by name)."""
    data: FewShotFeatures = ray.get(features[feature_key(config["dataset"], config["shots"], config["seed"])])
    new_classes = None
    if config.get("protocol") == BASE2NEW:
        data, new_classes = split_base_new(data)
    transfer = {name: ray.get(ref) for name, ref in (targets or {}).items()
                if config.get("protocol") == XD and name != config["dataset"]}
    return data, new_classes, transfer


def log_epoch(run: TrialRun, m: EpochMetrics) -> None:
    """One epoch's curves into the run (sent at once when the epoch was validated)."""
    run.log_metrics({"loss": m.loss, "train_acc": m.train_acc, "lr": m.lr, "epoch_seconds": m.seconds,
                     "val_acc": m.val_acc}, step=m.epoch, flush=m.val_acc is not None)


def finish_trial(run: TrialRun, config: dict[str, Any], settings: TrialSettings, backbone: Backbone,
                 data: FewShotFeatures, result: TrainResult, train_cfg: TrainConfig, key: str,
                 new_classes: EvalFeatures | None, transfer: dict[str, EvalFeatures]) -> dict[str, Any]:
    """A trained configuration's protocol evaluations, artifacts and final metrics into its run, closed FINISHED;
    returns its final result for Tune."""
    epochs = int(config["epochs"])
    meta = learned_meta(config, settings, backbone, data, result, key)
    evaluations = evaluate_protocol(config, backbone, result, meta, new_classes, transfer)
    with tempfile.TemporaryDirectory(prefix="coop-trial-") as tmp:
        write_artifacts(Path(tmp), config, settings, backbone, data, result, train_cfg, key, evaluations)
        run.log_artifacts(Path(tmp))
    run.log_metrics({"test_acc": result.test_acc, "train_seconds": result.train_seconds,
                     **protocol_metrics(evaluations)}, step=epochs, flush=True)
    last = result.epochs[-1]
    final = {"epoch": epochs, "loss": last.loss, "train_acc": last.train_acc, "lr": last.lr,
             "val_acc": result.val_acc, "test_acc": result.test_acc, "train_seconds": result.train_seconds,
             **evaluations, "trial_key": key, "mlflow_run_id": run.run_id}
    run.close("FINISHED")
    return final


def keeps_training(rungs: Any, key: str, epoch: int, val_acc: float) -> bool:
    """ASHA's decision for a configuration validated at `epoch` when the sweep runs it per configuration
    (`rungs`: a MemberRungs actor, in sweeps with bundles); True without one."""
    return rungs is None or bool(ray.get(rungs.on_result.remote(key, epoch, val_acc)))


def completed(rungs: Any, key: str) -> None:
    """Tell ASHA a configuration ran to its end (its last result counts once more, as Ray's scheduler does)."""
    if rungs is not None:
        ray.get(rungs.on_complete.remote(key))


def stopped_reason(epoch: int, epochs: int, val_acc: float) -> str:
    return f"stopped early by ASHA at epoch {epoch} of {epochs} (val_acc {val_acc:.2f} below its rung)"


class _StoppedByRungs(Exception):
    """MemberRungs stopped this configuration (raised out of the training loop, caught by run_trial)."""


def run_trial(config: dict[str, Any], settings: TrialSettings, features: dict[str, ray.ObjectRef],
              targets: dict[str, ray.ObjectRef] | None = None, rungs: Any = None) -> None:
    """Ray Tune function trainable of one configuration; `settings`, `features` and the transfer `targets`' test
    features arrive through tune.with_parameters (`rungs` too, in sweeps whose ASHA acts per configuration)."""
    config = complete(config)
    key = trial_key(config)
    torch.set_num_threads(max(1, int(settings.cpus_per_trial)))
    bound_http_retries()  # MLflow's own retries would stall this process for minutes per request
    run, finished = open_trial_run(config, settings, key)
    if finished is not None:  # resumed sweep: this trial completed before the interruption
        tune.report(reused_result(config, key, finished))
        return
    assert run is not None
    epochs = int(config["epochs"])
    last_epoch = 0
    try:
        data, new_classes, transfer = trial_inputs(config, features, targets)
        backbone = trial_backbone(settings)
        train_cfg = train_config(settings.train, config)

        def on_epoch(m: EpochMetrics) -> None:
            nonlocal last_epoch
            last_epoch = m.epoch
            log_epoch(run, m)
            if m.val_acc is None:
                return
            report = {"epoch": m.epoch, "loss": m.loss, "train_acc": m.train_acc, "lr": m.lr,
                      "val_acc": m.val_acc, "trial_key": key, "mlflow_run_id": run.run_id}
            # Asked at the last epoch too (the answer cannot stop it then), as Ray's ASHA sees a final result.
            if not keeps_training(rungs, key, m.epoch, m.val_acc) and m.epoch < epochs:
                raise _StoppedByRungs(stopped_reason(m.epoch, epochs, m.val_acc), report)
            if m.epoch < epochs:
                tune.report(report)

        result = train_method(backbone, data, trial_prompt(config), train_cfg, method_config(config), epochs,
                              on_epoch=on_epoch, progress=False)
        final = finish_trial(run, config, settings, backbone, data, result, train_cfg, key, new_classes, transfer)
        completed(rungs, key)
    except _StoppedByRungs as stop:
        reason, final = stop.args
        close_run(run, "KILLED", reason)
    except Exception as error:
        close_run(run, "FAILED", f"{type(error).__name__}: {error}")
        raise
    except BaseException as error:
        close_run(run, "KILLED", interrupted_reason(error, last_epoch, epochs))
        raise
    # Reported after the run is closed: Tune may end the trial inside this call (its last allowed step).
    tune.report(final)


def interrupted_reason(error: BaseException, last_epoch: int, epochs: int) -> str:
    """Why a run ended KILLED: Ray stops a trial by raising SystemExit out of tune.report (ASHA, or the sweep
    shutting down); anything else is an interrupt."""
    why = "stopped by Ray Tune (early stopping or sweep shutdown)" if isinstance(error, SystemExit) else (
        f"interrupted ({type(error).__name__})")
    return f"{why} after epoch {last_epoch} of {epochs}"
