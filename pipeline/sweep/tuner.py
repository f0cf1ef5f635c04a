"""Run a planned sweep on Ray Tune: check tracking and cluster, fit, settle the MLflow runs, write the results.

Order matters for failing fast: the plan (space errors), the tracking server (seconds), the Ray address
(seconds) and the feature caches are all checked before a Ray worker starts or a trial runs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from pipeline.atomic import write_json_atomic
from pipeline.data.protocols import BASE2NEW, FEWSHOT
from pipeline.params import Params
from pipeline.sweep.cluster import check_ray_address, check_resources, init_ray, resolve_address
from pipeline.sweep.plan import (
    BUNDLE,
    BundleRule,
    SweepError,
    SweepPlan,
    bundle_rule,
    check_precision,
    feature_key,
    members_of,
    plan_sweep,
    sweep_bundles,
)
from pipeline.sweep.results import ResultFiles, TrialRecord, counts, summarize, write_results
from pipeline.sweep.resume import (
    SweepState,
    mark_finished,
    read_state,
    rungs_path,
    state_path,
    unfinished_sweeps,
    write_state,
)
from pipeline.sweep.space import complete, max_epochs, trial_key
from pipeline.tracking import (
    NODE_TAG,
    REASON_TAG,
    SweepRun,
    TrackingError,
    TrialOutcome,
    backbone_label,
    check_tracking_uri,
    git_commit,
    resolve_tracking_uri,
)

log = logging.getLogger(__name__)


@dataclass
class SweepOptions:
    """Choices of one sweep run that are not params (those override params.sweep via dataclasses.replace)."""

    resume: str | None = None  # "latest" or an experiment name
    tracking_uri: str | None = None  # --tracking-uri: outranks MLFLOW_TRACKING_URI, which outranks tracking.uri
    verbose: int = 1  # console: 0 no progress line; 1 our progress line (callbacks.ProgressLog); 2 Ray's tables too
    progress_every_s: float | None = None  # seconds between progress lines; None: callbacks.PROGRESS_EVERY_S


@dataclass
class SweepOutcome:
    name: str
    experiment_path: Path
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    records: list[TrialRecord]
    files: ResultFiles
    wall_seconds: float
    fit_seconds: float
    interrupted: bool
    counts: dict[str, int] = field(default_factory=dict)


def run_sweep(params: Params, options: SweepOptions) -> SweepOutcome:
    """Plan, check, run and record one sweep (or resume one); see the module docstring for the order."""
    start = time.perf_counter()
    storage = Path(params.sweep.storage).resolve()
    state = read_state(storage, options.resume) if options.resume else None
    if state is not None:
        params = dataclasses.replace(params, sweep=dataclasses.replace(params.sweep, search=state.search))
    plan = plan_sweep(params)
    check_precision(params, plan)
    if state is not None:
        state.check_plan(plan)
    name = state.name if state is not None else (
        params.sweep.name or f"{plan.search}-{datetime.now():%Y%m%d-%H%M%S}")
    experiment_path = storage / name
    if state is None and (experiment_path.exists() or state_path(storage, name).exists()):
        raise SweepError(f"a sweep named {name!r} already exists under {storage} (sweep.storage): start this one "
                         f"with another --name, or continue that one with --resume {name} if it was interrupted")
    if state is None:
        for old in unfinished_sweeps(storage):
            log.warning("sweep %s (started %s) did not finish: its driver was interrupted or killed. This starts a "
                        "new sweep; to finish that one instead: python -m pipeline.sweep --resume %s",
                        old.name, old.created, old.name)

    uri = state.tracking_uri if state is not None else resolve_tracking_uri(options.tracking_uri, params.tracking.uri)
    if state is not None and options.tracking_uri and options.tracking_uri != uri:
        log.warning("resuming with the sweep's own tracking URI %s (ignoring %s)", uri, options.tracking_uri)
    try:
        check_tracking_uri(uri, timeout=params.tracking.check_timeout_s)
    except TrackingError as error:
        raise SweepError(str(error)) from None
    address = resolve_address(params)
    if address:
        check_ray_address(address)

    from pipeline.sweep.inputs import check_protocols, load_inputs, transfer_targets

    inputs = load_inputs(params, plan.triples, transfer_targets(params, plan))
    check_protocols(plan, inputs)
    trials, rule = plan_trials(params, plan, inputs)
    bundled = any(BUNDLE in t for t in trials) or (plan.search == "optuna" and rule.bundles)
    member_asha = state.member_asha if state is not None else params.sweep.asha and bundled

    commit = git_commit()
    if state is None:
        parent = SweepRun.start(
            uri, params.tracking.experiment, name,
            params=parent_run_params(params, plan),
            tags={"git_commit": commit, "search": plan.search, "backbone_fingerprint": inputs.backbone.fingerprint,
                  "ray_experiment": str(experiment_path),
                  **{f"feature_cache.{d}": fp for d, fp in inputs.cache_fingerprints.items()}},
        )
        state = SweepState(
            name=name, search=plan.search, plan=plan.fingerprint(), tracking_uri=uri,
            experiment_id=parent.experiment_id, parent_run_id=parent.run_id,
            created=datetime.now().isoformat(timespec="seconds"), member_asha=member_asha,
        )
        write_state(storage, state)
        resume = False
    else:
        parent = SweepRun.reopen(uri, state.parent_run_id)
        resume = True
        # Runs of trials that were training when the last driver died were never closed by anyone.
        orphans = parent.close_orphans("the sweep's driver ended (killed or crashed) while this trial ran; "
                                       "--resume trains the trial again in a new attempt (a new run)")
        if orphans:
            log.warning("closed %d MLflow run(s) orphaned by the previous driver as KILLED", orphans)
    log.info("sweep %s: MLflow parent run %s in %s", name, parent.run_id, uri)

    started_ray = False
    try:
        started_ray = init_ray(address)
        outcome = _fit(params, options, plan, trials, rule, inputs, parent, name, experiment_path, commit,
                       resume=resume, member_asha=member_asha)
    except BaseException:
        _tracked("mark the sweep's parent run FAILED", lambda: parent.client.set_terminated(parent.run_id, "FAILED"),
                 None)
        raise
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    outcome.wall_seconds = time.perf_counter() - start
    if not outcome.interrupted:
        mark_finished(storage, state)
    return outcome


def plan_trials(params: Params, plan: SweepPlan, inputs: Any) -> tuple[list[dict[str, Any]], BundleRule]:
    """The Ray trials' configs (grid/random configurations gathered into bundles by sweep.bundle_size; optuna: its
    candidates, bundled as TPE suggests them) and the rule that bundles them."""
    from pipeline.engine.inputs import split_base_new

    shapes: dict[tuple[str, str], tuple[int, int]] = {}  # (feature key, protocol) -> (classes, training items)

    def shape_of(config: dict[str, Any]) -> tuple[int, int]:
        key = (feature_key(config["dataset"], config["shots"], config["seed"]), config["protocol"])
        if key not in shapes:
            data = inputs.features[key[0]]
            data = split_base_new(data)[0] if config["protocol"] == BASE2NEW else data
            shapes[key] = (len(data.classnames), len(data.train_labels))
        return shapes[key]

    rule = bundle_rule(params, lambda c: shape_of(c)[0], lambda c: shape_of(c)[1])
    trials = sweep_bundles(plan.search, plan.configs, rule)
    bundled = [len(members_of(t)) for t in trials if BUNDLE in t]
    if bundled:
        log.info("bundles (sweep.bundle_size %s): %d configurations in %d trials, %d bundles of %d-%d",
                 params.sweep.bundle_size, len(plan.configs), len(trials), len(bundled), min(bundled), max(bundled))
    elif plan.search == "optuna" and rule.bundles:
        log.info("bundles (sweep.bundle_size %s): TPE's suggestions are gathered into bundles as they come",
                 params.sweep.bundle_size)
    return trials, rule


def _tracked(what: str, call: Any, fallback: Any) -> Any:
    """`call()`, or `fallback` with an error logged when the tracking server fails it (MLflow has by then
    retried for minutes): the driver's bookkeeping must not cost the sweep's result tables."""
    try:
        return call()
    except Exception as error:  # MlflowException, requests' errors, TrackingError: all mean the same here
        log.error("could not %s in MLflow (%s: %s); the result tables are written from Ray's results and "
                  "runs may stay RUNNING until --resume settles them", what, type(error).__name__, str(error)[:300])
        return fallback


def parent_run_params(params: Params, plan: SweepPlan) -> dict[str, Any]:
    """What the sweep's MLflow parent run logs as params: the search, its space, resources and backbone."""
    return {"search": plan.search, "num_samples": plan.num_samples, "max_concurrent": plan.max_concurrent,
            "asha": params.sweep.asha, "retries": params.sweep.retries,
            "space": json.dumps({k: list(v) for k, v in plan.space.values.items()}),
            "backbone": backbone_label(params.backbone.arch, params.backbone.pretrained),
            "cpus_per_trial": params.sweep.cpus_per_trial, "gpus_per_trial": params.sweep.gpus_per_trial}


def _trial_dirname(trial: Any) -> str:
    # Ray's default folder name spells out the whole config (ctx_init strings included): too long.
    return f"trial_{trial.trial_id}"


def _scheduler(plan: SweepPlan, params: Params) -> Any:
    """ASHA on val_acc by epoch when sweep.asha (or --asha), else None: every trial runs to its last epoch."""
    if not params.sweep.asha:
        return None
    from ray.tune.schedulers import ASHAScheduler

    if params.train.eval_every < 1:
        log.warning("ASHA acts on intermediate val_acc, but train.eval_every=0 evaluates only at the end; "
                    "set train.eval_every > 0 for early stopping to happen")
    top = max_epochs(plan.configs)
    return ASHAScheduler(time_attr="epoch", metric="val_acc", mode="max", max_t=top,
                         grace_period=min(params.sweep.asha_grace_epochs, top),
                         reduction_factor=params.sweep.asha_reduction_factor)


def _records(results: Any, children: dict[str, Any], plan: SweepPlan, ended: set[str]) -> list[TrialRecord]:
    """One record per configuration (a bundle's members each), with its final state, accuracies and MLflow run.

    Planned grid/random configurations that Ray never created (the sweep was interrupted first) are listed as
    UNFINISHED too, so trials.csv always shows the whole plan.
    """
    from pipeline.sweep.bundle_trial import FAILED, FINISHED, MEMBERS, STOPPED

    # Ray's Trial objects (status, id) sit beside the Results in the same order; Result has no status.
    trials = list(getattr(getattr(results, "_experiment_analysis", None), "trials", None) or [])
    records = []
    for index, result in enumerate(results):
        trial = trials[index] if index < len(trials) else None
        metrics = result.metrics or {}
        trial_id = trial.trial_id if trial is not None else str(metrics.get("trial_id", ""))
        status = trial.status if trial is not None else "TERMINATED"
        # A trial that never reported has no result config (Ray found no result.json): its Trial still has one.
        trial_config = result.config or (trial.config if trial is not None else None)
        if not trial_config:
            continue  # its planned configurations are listed as "not started" below
        for member in members_of(trial_config):
            config = complete(member)
            key = trial_key(config)
            if BUNDLE in trial_config:
                own = (metrics.get(MEMBERS) or {}).get(key, {})
                # A member's own state, unless the bundle ended before it did (crashed: FAILED; cut off: UNFINISHED).
                state = own.get("state") if own.get("state") in (FINISHED, STOPPED, FAILED) else (
                    FAILED if result.error is not None else "UNFINISHED")
            else:
                own, state = metrics, _plain_state(metrics, result.error, status, trial_id in ended)
            records.append(_record(config, key, own, state, trial_id, children.get(key), result.error))
    if plan.search != "optuna":
        created = {r.trial_key for r in records}
        records += [TrialRecord(config=dict(c), trial_key=trial_key(c), reason="not started")
                    for c in plan.configs if trial_key(c) not in created]
    return records


def _plain_state(metrics: dict[str, Any], error: Any, status: str, ended: bool) -> str:
    """A one-configuration trial's state from Ray's word on it."""
    test = metrics.get("test_acc")
    if error is not None:
        return "FAILED"
    if isinstance(test, (int, float)) and math.isfinite(test):
        return "FINISHED"
    return "STOPPED" if status == "TERMINATED" and ended else "UNFINISHED"


def _record(config: dict[str, Any], key: str, metrics: dict[str, Any], state: str, trial_id: str, run: Any,
            error: Any) -> TrialRecord:
    reason = run.data.tags.get(REASON_TAG, "") if run is not None else ""
    if not reason and state != "FINISHED":
        reason = str(metrics.get("reason", ""))
    if not reason and error is not None:
        reason = f"{type(error).__name__}: {str(error).strip().splitlines()[-1][:300]}"
    finished = state == "FINISHED"
    return TrialRecord(
        config=config, trial_id=trial_id, trial_key=key, state=state,
        val_acc=metrics.get("val_acc"), test_acc=metrics.get("test_acc") if finished else None,
        new_acc=metrics.get("new_acc") if finished else None, h_acc=metrics.get("h_acc") if finished else None,
        transfer=dict(metrics.get("transfer") or {}) if finished else {},
        train_seconds=metrics.get("train_seconds"),
        last_epoch=metrics.get("epoch"),
        node_ip=(run.data.tags.get(NODE_TAG, "") if run is not None else "") or str(metrics.get("node_ip", "")),
        mlflow_run_id=run.info.run_id if run is not None else str(metrics.get("mlflow_run_id", "")),
        reason=reason if state != "FINISHED" else "",
    )


def _failure_reason(record: TrialRecord) -> str:
    """What MLflow's sweep.failure_reason tag should say about a trial that did not finish."""
    if record.state == "STOPPED":
        return (f"stopped early by ASHA at epoch {record.last_epoch} of {record.config['epochs']} "
                f"(val_acc {record.val_acc} below its rung)")
    if record.state == "UNFINISHED":
        return "the sweep was interrupted before this trial finished; resume it with --resume"
    return record.reason


def _parent_metrics(records: list[TrialRecord]) -> dict[str, float]:
    metrics: dict[str, float] = {f"trials_{k}": v for k, v in counts(records).items()}
    for s in summarize(records):
        if s.best:
            setting = f"{s.dataset}.{s.shots}shot" + ("" if s.protocol == FEWSHOT else f".{s.protocol}")
            metrics[f"best_val_acc.{setting}"] = s.val_mean
            metrics[f"best_test_acc.{setting}"] = s.test_mean
            if s.protocol == BASE2NEW:
                metrics[f"best_new_acc.{setting}"] = s.new_mean
                metrics[f"best_h_acc.{setting}"] = s.h_of_means
    return {k: v for k, v in metrics.items() if math.isfinite(v)}


def _trial_steps(trials: list[dict[str, Any]], inputs: Any, batch: int) -> dict[str, int]:
    """The work of each planned Ray trial by its key, optimizer steps times configurations (the progress line's
    ETA scales durations by it)."""
    from pipeline.sweep.callbacks import ray_trial_key
    from pipeline.sweep.estimate import steps_per_epoch

    steps = {}
    for t in trials:
        c = members_of(t)[0]
        train = inputs.features[feature_key(c["dataset"], c["shots"], c["seed"])].train_labels
        steps[ray_trial_key(t)] = (int(c["epochs"]) * steps_per_epoch(len(train), c.get("batch_size") or batch)
                                   * len(members_of(t)))
    return steps


def _member_rungs(plan: SweepPlan, params: Params, experiment_path: Path, resume: bool) -> Any:
    """The MemberRungs actor every trial asks at each validation (ASHA per configuration, in sweeps with
    bundles), restored from the rungs a previous driver session recorded."""
    import ray

    from pipeline.sweep.rungs import MemberRungs

    if params.train.eval_every < 1:
        log.warning("ASHA acts on intermediate val_acc, but train.eval_every=0 evaluates only at the end; "
                    "set train.eval_every > 0 for early stopping to happen")
    saved = rungs_path(experiment_path.parent, experiment_path.name)
    top = max_epochs(plan.configs)
    rungs = ray.remote(num_cpus=0)(MemberRungs).remote(
        max_t=top, grace_period=min(params.sweep.asha_grace_epochs, top),
        reduction_factor=params.sweep.asha_reduction_factor)
    if resume and saved.is_file():
        try:
            ray.get(rungs.restore.remote(json.loads(saved.read_text())))
        except (ValueError, ray.exceptions.RayTaskError) as error:
            log.warning("ASHA starts with empty rungs: %s is not a rungs state this sweep can use (%s)", saved,
                        str(error).strip().splitlines()[-1])
    return rungs


def _fit(params: Params, options: SweepOptions, plan: SweepPlan, trials: list[dict[str, Any]], rule: BundleRule,
         inputs: Any, parent: SweepRun, name: str, experiment_path: Path, commit: str, resume: bool,
         member_asha: bool) -> SweepOutcome:
    import ray
    from ray import tune

    from pipeline.engine.backbone import worker_weights
    from pipeline.sweep.bundle_trial import run_sweep_trial
    from pipeline.sweep.callbacks import (
        PROGRESS_EVERY_S,
        WATCHERS,
        EndWatcher,
        ProgressLog,
        best_table,
        ray_resume_hint_dropped,
    )
    from pipeline.sweep.contexts import export_contexts
    from pipeline.sweep.searchers import build_searcher
    from pipeline.sweep.trial import TrialSettings, recorded_feature_settings, run_name, trial_params

    check_resources(params)
    refs = {k: ray.put(v) for k, v in inputs.features.items()}
    target_refs = {k: ray.put(v) for k, v in inputs.targets.items()}
    settings = TrialSettings(
        sweep_name=name,
        arch=params.backbone.arch,
        # Trials run in their own working directories: a local checkpoint goes to them as an absolute path.
        pretrained=worker_weights(inputs.backbone.pretrained),
        backbone_fingerprint=inputs.backbone.fingerprint,
        train=params.train,
        tracking_uri=parent.uri,
        experiment_id=parent.experiment_id,
        parent_run_id=parent.run_id,
        git_commit=commit,
        cache_fingerprints=inputs.cache_fingerprints,
        feature_settings=recorded_feature_settings(params.features),
        nearest_words=params.sweep.nearest_words,
        cpus_per_trial=params.sweep.cpus_per_trial,
        tracking_outage_limit_s=params.tracking.outage_limit_s,
    )
    rungs = _member_rungs(plan, params, experiment_path, resume) if member_asha else None
    trainable = tune.with_resources(
        tune.with_parameters(run_sweep_trial, settings=settings, features=refs, targets=target_refs, rungs=rungs),
        {"cpu": params.sweep.cpus_per_trial, "gpu": params.sweep.gpus_per_trial},
    )
    every_s = PROGRESS_EVERY_S if options.progress_every_s is None else options.progress_every_s
    fit_start = time.perf_counter()
    if resume:
        if not tune.Tuner.can_restore(str(experiment_path)):
            raise SweepError(f"no Ray Tune state at {experiment_path} to resume from (was the sweep ever started?)")
        tuner = tune.Tuner.restore(str(experiment_path), trainable=trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
    else:
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=build_searcher(plan, params.sweep.optuna_seed, trials, rule),
                # With bundles Tune's ASHA would stop whole bundles: MemberRungs decides per configuration.
                scheduler=None if member_asha else _scheduler(plan, params),
                num_samples=len(trials) if plan.search != "optuna" else plan.num_samples,
                max_concurrent_trials=plan.max_concurrent,
                reuse_actors=True,  # one worker process (and backbone load) serves many trials
                trial_dirname_creator=_trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=str(experiment_path.parent),
                failure_config=tune.FailureConfig(max_failures=params.sweep.retries),
                callbacks=[EndWatcher(name), ProgressLog(name, plan.num_samples, every_s,
                                                         _trial_steps(trials, inputs, params.train.batch_size))],
                verbose=1 if options.verbose >= 2 else 0,  # our progress line replaces Ray's per-trial tables
            ),
        )
    try:
        with ray_resume_hint_dropped():  # the warning below names our command, not Tuner.restore
            results = tuner.fit()
    finally:
        if rungs is not None:  # a resumed driver's ASHA goes on from the rungs recorded so far
            write_json_atomic(rungs_path(experiment_path.parent, name), ray.get(rungs.state.remote()))
    fit_seconds = time.perf_counter() - fit_start
    watcher = WATCHERS.pop(name, None)
    ended = watcher.all_ended() if watcher is not None else set()

    # Settle MLflow: each child run agrees with Ray's final word on its trial (a worker that crashed or was
    # stopped could not close its own run), then the records are read again with the settled runs. With the
    # tracking server gone the tables still come from Ray's results: the trials' work is not lost with it.
    children = _tracked("read the trials' runs", parent.trial_runs, None)
    records = _records(results, children or {}, plan, ended)
    outcomes = {}
    for record in records:
        outcomes[record.trial_key] = TrialOutcome(
            state=record.state,
            reason=_failure_reason(record),
            run_name=run_name(record.config),
            params=trial_params(record.config, settings),
            tags={"sweep.name": name, "ray.trial_id": record.trial_id, "dataset": record.config["dataset"],
                  "shots": record.config["shots"], "seed": record.config["seed"], "git_commit": commit,
                  "method": record.config["method"], "protocol": record.config["protocol"]},
        )
    if children is not None:  # the server answered
        _tracked("settle the trials' runs", lambda: parent.settle(outcomes), None)
        children = _tracked("read the settled runs", parent.trial_runs, children)
        records = _records(results, children, plan, ended)

    results_dir = Path(params.sweep.results_dir).resolve()
    exported = _tracked("copy the learned contexts",
                        lambda: export_contexts(parent.uri, records, results_dir / "contexts",
                                                progress=options.verbose > 0), 0)
    log.info("copied %d learned context(s) from MLflow into %s", exported, results_dir / "contexts")
    files = write_results(results_dir, records)
    tally = counts(records)
    # Fewer optuna trials than asked for means Tune stopped early (the searcher caps num_samples itself).
    interrupted = tally["unfinished"] > 0 or len(records) < plan.num_samples
    _tracked("close the sweep's parent run", lambda: parent.finish("KILLED" if interrupted else "FINISHED",
                                                                  _parent_metrics(records), files.all()), None)
    if interrupted:
        log.warning("sweep %s interrupted with %d unfinished trial(s); continue it with: "
                    "python -m pipeline.sweep --resume %s", name, tally["unfinished"], name)
    log.info("sweep %s: %s; results in %s", name, ", ".join(f"{v} {k}" for k, v in tally.items()), files.trials.parent)
    log.info("%s", best_table(summarize(records)))
    return SweepOutcome(name, experiment_path, parent.uri, parent.experiment_id, parent.run_id, records, files,
                        0.0, fit_seconds, interrupted, tally)
