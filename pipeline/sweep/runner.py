"""Run a CoOp sweep on Ray Tune: plan the trials, check cluster and tracking, fit, settle MLflow, write results.

Order matters for failing fast: the plan (space errors), the tracking server (seconds), the Ray address
(seconds) and the feature caches are all checked before a Ray worker starts or a trial runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pipeline.atomic import write_json_atomic
from pipeline.errors import UserError
from pipeline.params import Params
from pipeline.sweep.results import ResultFiles, TrialRecord, counts, summarize, write_results
from pipeline.sweep.space import (
    CONFIG_KEYS,
    SearchSpace,
    build_space,
    check_searchable,
    max_epochs,
    trial_key,
)
from pipeline.tracking import (
    NODE_TAG,
    REASON_TAG,
    SweepRun,
    TrackingError,
    TrialOutcome,
    check_tracking_uri,
    git_commit,
    resolve_tracking_uri,
)

log = logging.getLogger(__name__)

GPU_PRECISIONS = ("fp16", "amp")


class SweepError(UserError, RuntimeError):
    """The sweep cannot start or resume; the message says why and what to do."""


@dataclass
class SweepOptions:
    """Command-line choices; None means: take it from params.yaml (sweep.*)."""

    search: str | None = None
    num_samples: int | None = None
    max_concurrent: int | None = None
    address: str | None = None
    resume: str | None = None  # "latest" or an experiment name
    tracking_uri: str | None = None
    name: str | None = None
    asha: bool | None = None
    dry_run: bool = False
    verbose: int = 1  # Ray Tune's progress output: 0 silent, 1 status table


@dataclass
class SweepPlan:
    search: str
    space: SearchSpace
    configs: list[dict[str, Any]]  # grid/random: the trials, in order; optuna: every configuration TPE may pick
    num_samples: int  # trials to run (optuna: at most)
    max_concurrent: int

    @property
    def triples(self) -> list[tuple[str, int, int]]:
        """(dataset, shots, seed) whose features the trials need."""
        return sorted({(c["dataset"], c["shots"], c["seed"]) for c in self.configs})

    def fingerprint(self) -> str:
        text = json.dumps({"search": self.search, "space": {k: list(v) for k, v in self.space.values.items()}},
                          sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def describe(self, limit: int = 200) -> str:
        """The dry-run listing: what will run, and how many."""
        if self.search == "optuna":
            head = (
                f"optuna (TPE): up to {self.num_samples} trials, chosen adaptively from these "
                f"{len(self.configs)} distinct valid configurations (searching {', '.join(self.space.searched_keys())}):"
            )
        else:
            head = f"{self.search}: {len(self.configs)} trials:"
        widths = {"dataset": 14, "shots": 5, "seed": 4, "n_ctx": 5, "ctx_init": 16, "csc": 5,
                  "class_token_position": 8, "lr": 9, "epochs": 6, "precision": 9}
        names = {"class_token_position": "position"}
        lines = [head, "  #    " + " ".join(f"{names.get(k, k):<{w}}" for k, w in widths.items()) + " key"]
        for i, c in enumerate(self.configs[:limit], 1):
            cells = " ".join(f"{_cell(c[k]):<{w}}" for k, w in widths.items())
            lines.append(f"  {i:<4} {cells} {trial_key(c)}")
        if len(self.configs) > limit:
            lines.append(f"  ... {len(self.configs) - limit} more")
        count = self.num_samples if self.search == "optuna" else len(self.configs)
        lines.append(f"{count} trial(s) would run ({self.search}; max {self.max_concurrent} at a time).")
        return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, str):
        return repr(value) if value == "" or " " in value else value
    return f"{value:g}" if isinstance(value, float) else str(value)


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


def plan_sweep(params: Params, options: SweepOptions) -> SweepPlan:
    """The trials to run (grid, random) or to choose from (optuna); SpaceError on a bad or empty space."""
    search = options.search or params.sweep.search
    space = build_space(params)
    check_searchable(space, search)
    num_samples = options.num_samples or params.sweep.num_samples
    max_concurrent = options.max_concurrent or params.sweep.max_concurrent
    if num_samples < 1 or max_concurrent < 1:
        raise SweepError(f"--num-samples and --max-concurrent must be >= 1 (got {num_samples}, {max_concurrent})")
    configs = space.enumerate()
    if search == "random":
        if num_samples > len(configs):
            log.warning("random: only %d distinct valid configurations; running each once", len(configs))
        configs = space.sample(num_samples, params.sweep.optuna_seed)
    elif search == "grid" and options.num_samples:
        log.info("grid runs every distinct configuration once; --num-samples is ignored")
    elif search == "optuna" and num_samples > len(configs):
        log.warning("optuna: only %d distinct valid configurations; the search ends after trying them all",
                    len(configs))
        num_samples = len(configs)
    if search != "optuna":
        num_samples = len(configs)
    return SweepPlan(search, space, configs, num_samples, max_concurrent)


def _check_precision(params: Params, plan: SweepPlan) -> None:
    gpu_wanted = params.sweep.gpus_per_trial > 0 or params.train.device.startswith("cuda")
    needs_gpu = sorted({p for p in plan.space.values["precision"] if p in GPU_PRECISIONS})
    if needs_gpu and not gpu_wanted:
        raise SweepError(
            f"precision {', '.join(needs_gpu)} needs a GPU but trials get none (sweep.gpus_per_trial=0); "
            "set sweep.gpus_per_trial > 0 or sweep.space.precision to fp32/bf16"
        )


def resolve_address(options: SweepOptions, params: Params) -> str | None:
    """--address, else sweep.address, else RAY_ADDRESS; None: start a local Ray instance."""
    address = options.address or params.sweep.address or os.environ.get("RAY_ADDRESS") or None
    return None if address in (None, "", "local") else address


_GCS_PROBE = (
    "import sys\n"
    "from ray._raylet import GcsClient\n"
    "GcsClient(address=sys.argv[1]).internal_kv_get(b'coop-sweep-probe', None)\n"
)


def check_ray_address(address: str, timeout: float = 5.0, probe_timeout: float = 20.0) -> None:
    """Fail in seconds, not minutes, when a Ray address is dead, is not a Ray head, or refuses our auth.

    ray.init retries an unresponsive GCS for many minutes, so first one bounded TCP connect, then one
    request to the GCS from a short-lived process that is killed after `probe_timeout` seconds.
    """
    if address == "auto":
        return
    client = address.startswith("ray://")
    parsed = urlparse(address if "://" in address else f"ray://{address}")
    host = parsed.hostname
    port = parsed.port or (10001 if client else 6379)
    if not host:
        raise SweepError(f"cannot read a host from the Ray address {address!r}; use host:port, e.g. 10.0.0.1:6379")
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as error:
        raise SweepError(
            f"the Ray cluster at {address} does not answer ({error}). Start its head with "
            f"`ray start --head --port={port}` (see docs/cluster.md), check the address, "
            "or leave --address out to run on a local Ray instance."
        ) from None
    if client:
        return  # a Ray Client server speaks another protocol; ray.init reports its own errors quickly
    try:
        probe = subprocess.run([sys.executable, "-c", _GCS_PROBE, f"{host}:{port}"], capture_output=True,
                               text=True, timeout=probe_timeout)
    except subprocess.TimeoutExpired:
        raise SweepError(
            f"{address} accepts connections but does not answer as a Ray cluster within {probe_timeout:g}s; "
            "give the head's GCS address (`ray start --head` prints it; port 6379 by default)"
        ) from None
    if probe.returncode != 0:
        detail = " ".join(probe.stderr.strip().splitlines()[-3:])[-600:]
        raise SweepError(
            f"the Ray cluster at {address} refused this driver: {detail}\nThe driver must use the head's "
            "RAY_AUTH_MODE and, with token auth, its RAY_AUTH_TOKEN (see docs/cluster.md)."
        )


def _init_ray(address: str | None) -> bool:
    """Connect to (or start) Ray; True when this call started it and should shut it down."""
    import ray

    if ray.is_initialized():
        if address:
            log.info("Ray is already initialised in this process; using it rather than %s", address)
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:
            # A sweep on this machine alone: keep every Ray socket on loopback.
            ray.init(address="local", _node_ip_address="127.0.0.1", **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise SweepError(
            f"could not connect to Ray at {address or 'a new local instance'}: {error}. A joining node and the "
            "driver must use the head's RAY_AUTH_MODE (and token); see docs/cluster.md."
        ) from None
    return True


def _check_resources(params: Params) -> None:
    import ray

    available = ray.cluster_resources()
    cpus, gpus = params.sweep.cpus_per_trial, params.sweep.gpus_per_trial
    if available.get("CPU", 0) < cpus or available.get("GPU", 0) < gpus:
        raise SweepError(
            f"a trial asks for {cpus:g} CPU and {gpus:g} GPU (sweep.cpus_per_trial / gpus_per_trial) but the "
            f"Ray cluster has {available.get('CPU', 0):g} CPU and {available.get('GPU', 0):g} GPU in total"
        )


def _trial_dirname(trial: Any) -> str:
    # Ray's default folder name spells out the whole config (ctx_init strings included): too long.
    return f"trial_{trial.trial_id}"


def _state_path(storage: Path, name: str) -> Path:
    return storage / f"{name}.sweep.json"


def _read_state(storage: Path, resume: str) -> dict[str, Any]:
    name = resume
    if resume == "latest":
        latest = storage / "latest.json"
        if not latest.is_file():
            raise SweepError(f"nothing to resume: no sweep has started under {storage} (sweep.storage)")
        name = json.loads(latest.read_text())["name"]
    path = _state_path(storage, name)
    if not path.is_file():
        known = sorted(p.name[: -len(".sweep.json")] for p in storage.glob("*.sweep.json"))
        raise SweepError(f"no sweep named {name!r} under {storage}; known: {', '.join(known) or 'none'}")
    return json.loads(path.read_text())


def _searcher(plan: SweepPlan, params: Params) -> Any:
    from pipeline.sweep.searchers import ConfigListSearcher, UniqueSearcher

    if plan.search != "optuna":
        return ConfigListSearcher(plan.configs)
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # group=True models the conditional space (n_ctx/csc exist only under random init) jointly; fewer
        # random start-up trials than Optuna's 10 so TPE gets to act within a small budget.
        sampler = optuna.samplers.TPESampler(
            seed=params.sweep.optuna_seed, multivariate=True, group=True,
            n_startup_trials=max(2, min(10, plan.num_samples // 2)),
        )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    inner = OptunaSearch(space=plan.space.define_by_run(), metric="val_acc", mode="max", sampler=sampler)
    return UniqueSearcher(inner, plan.space)


def _scheduler(plan: SweepPlan, params: Params, asha: bool) -> Any:
    if not asha:
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
    """One record per trial, with its final state, accuracies and MLflow run.

    Planned grid/random trials that Ray never created (the sweep was interrupted first) are listed as
    UNFINISHED too, so trials.csv always shows the whole plan.
    """
    # Ray's Trial objects (status, id) sit beside the Results in the same order; Result has no status.
    trials = list(getattr(getattr(results, "_experiment_analysis", None), "trials", None) or [])
    records = []
    for index, result in enumerate(results):
        trial = trials[index] if index < len(trials) else None
        config = {k: result.config[k] for k in CONFIG_KEYS}
        key = trial_key(config)
        metrics = result.metrics or {}
        trial_id = trial.trial_id if trial is not None else str(metrics.get("trial_id", ""))
        status = trial.status if trial is not None else "TERMINATED"
        run = children.get(key)
        test = metrics.get("test_acc")
        if result.error is not None:
            state = "FAILED"
        elif isinstance(test, (int, float)) and math.isfinite(test):
            state = "FINISHED"
        elif status == "TERMINATED" and trial_id in ended:
            state = "STOPPED"
        else:
            state = "UNFINISHED"
        reason = run.data.tags.get(REASON_TAG, "") if run is not None else ""
        if not reason and result.error is not None:
            reason = f"{type(result.error).__name__}: {str(result.error).strip().splitlines()[-1][:300]}"
        records.append(TrialRecord(
            config=config, trial_id=trial_id, trial_key=key, state=state,
            val_acc=metrics.get("val_acc"), test_acc=test if state == "FINISHED" else None,
            train_seconds=metrics.get("train_seconds"),
            last_epoch=metrics.get("epoch"),
            node_ip=(run.data.tags.get(NODE_TAG, "") if run is not None else "") or str(metrics.get("node_ip", "")),
            mlflow_run_id=run.info.run_id if run is not None else str(metrics.get("mlflow_run_id", "")),
            reason=reason if state != "FINISHED" else "",
        ))
    if plan.search != "optuna":
        created = {r.trial_key for r in records}
        records += [TrialRecord(config=dict(c), trial_key=trial_key(c), reason="not started")
                    for c in plan.configs if trial_key(c) not in created]
    return records


def _reason(record: TrialRecord) -> str:
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
            metrics[f"best_val_acc.{s.dataset}.{s.shots}shot"] = s.val_mean
            metrics[f"best_test_acc.{s.dataset}.{s.shots}shot"] = s.test_mean
    return {k: v for k, v in metrics.items() if math.isfinite(v)}


def run_sweep(params: Params, options: SweepOptions) -> SweepOutcome:
    """Plan, check, run and record one sweep (or resume one); see the module docstring for the order."""
    start = time.perf_counter()
    storage = Path(params.sweep.storage).resolve()
    state = _read_state(storage, options.resume) if options.resume else None
    if state is not None:
        options = SweepOptions(**{**asdict(options), "search": state["search"]})
    plan = plan_sweep(params, options)
    _check_precision(params, plan)
    if state is not None and state["plan"] != plan.fingerprint():
        raise SweepError(
            f"sweep {state['name']!r} was started with other sweep.space / data settings; resume needs the "
            "params it started with (or start a new sweep without --resume)"
        )

    uri = state["tracking_uri"] if state is not None else resolve_tracking_uri(options.tracking_uri, params.tracking.uri)
    if state is not None and options.tracking_uri and options.tracking_uri != uri:
        log.warning("resuming with the sweep's own tracking URI %s (ignoring %s)", uri, options.tracking_uri)
    try:
        check_tracking_uri(uri, timeout=params.tracking.check_timeout_s)
    except TrackingError as error:
        raise SweepError(str(error)) from None
    address = resolve_address(options, params)
    if address:
        check_ray_address(address)

    from pipeline.sweep.inputs import load_inputs

    inputs = load_inputs(params, plan.triples)

    name = state["name"] if state is not None else (
        options.name or params.sweep.name or f"{plan.search}-{datetime.now():%Y%m%d-%H%M%S}")
    experiment_path = storage / name
    if state is None and experiment_path.exists():
        raise SweepError(f"a sweep named {name!r} already exists under {storage}; resume it with --resume {name} "
                         "or choose another --name")

    commit = git_commit()
    if state is None:
        parent = SweepRun.start(
            uri, params.tracking.experiment, name,
            params={"search": plan.search, "num_samples": plan.num_samples, "max_concurrent": plan.max_concurrent,
                    "asha": options.asha if options.asha is not None else params.sweep.asha,
                    "retries": params.sweep.retries, "space": json.dumps({k: list(v) for k, v in plan.space.values.items()}),
                    "backbone": f"{params.backbone.arch}/{params.backbone.pretrained}", "cpus_per_trial": params.sweep.cpus_per_trial,
                    "gpus_per_trial": params.sweep.gpus_per_trial},
            tags={"git_commit": commit, "search": plan.search, "backbone_fingerprint": inputs.backbone.fingerprint,
                  "ray_experiment": str(experiment_path),
                  **{f"feature_cache.{d}": fp for d, fp in inputs.cache_fingerprints.items()}},
        )
        storage.mkdir(parents=True, exist_ok=True)
        write_json_atomic(_state_path(storage, name), {
            "name": name, "search": plan.search, "plan": plan.fingerprint(), "tracking_uri": uri,
            "experiment_id": parent.experiment_id, "parent_run_id": parent.run_id,
            "created": datetime.now().isoformat(timespec="seconds"),
        })
        write_json_atomic(storage / "latest.json", {"name": name})
    else:
        parent = SweepRun.reopen(uri, state["parent_run_id"])
    log.info("sweep %s: MLflow parent run %s in %s", name, parent.run_id, uri)

    started_ray = False
    try:
        started_ray = _init_ray(address)
        outcome = _fit(params, options, plan, inputs, parent, name, experiment_path, commit, resume=state is not None)
    except BaseException:
        parent.client.set_terminated(parent.run_id, "FAILED")
        raise
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    outcome.wall_seconds = time.perf_counter() - start
    return outcome


def _fit(params: Params, options: SweepOptions, plan: SweepPlan, inputs: Any, parent: SweepRun, name: str,
         experiment_path: Path, commit: str, resume: bool) -> SweepOutcome:
    import ray
    from ray import tune

    from pipeline.sweep.callbacks import WATCHERS, EndWatcher
    from pipeline.sweep.contexts import export_contexts
    from pipeline.sweep.trial import TrialContext, run_name, run_trial, trial_params

    _check_resources(params)
    refs = {k: ray.put(v) for k, v in inputs.features.items()}
    train = params.train
    context = TrialContext(
        sweep_name=name,
        arch=params.backbone.arch,
        pretrained=inputs.backbone.pretrained,
        backbone_fingerprint=inputs.backbone.fingerprint,
        device=train.device,
        train={"momentum": train.momentum, "weight_decay": train.weight_decay, "warmup_epochs": train.warmup_epochs,
               "warmup_lr": train.warmup_lr, "batch_size": train.batch_size, "eval_every": train.eval_every,
               "shared_prefix": train.shared_prefix, "pack_tokens": train.pack_tokens,
               "cuda_graph": train.cuda_graph},
        tracking_uri=parent.uri,
        experiment_id=parent.experiment_id,
        parent_run_id=parent.run_id,
        git_commit=commit,
        cache_fingerprints=inputs.cache_fingerprints,
        feature_settings={"views": params.features.views, "dtype": params.features.dtype, "seed": params.features.seed},
        nearest_words=params.sweep.nearest_words,
        cpus_per_trial=params.sweep.cpus_per_trial,
    )
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, context=context, features=refs),
        {"cpu": params.sweep.cpus_per_trial, "gpu": params.sweep.gpus_per_trial},
    )
    storage = experiment_path.parent
    fit_start = time.perf_counter()
    if resume:
        if not tune.Tuner.can_restore(str(experiment_path)):
            raise SweepError(f"no Ray Tune state at {experiment_path} to resume from (was the sweep ever started?)")
        tuner = tune.Tuner.restore(str(experiment_path), trainable=trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
    else:
        asha = options.asha if options.asha is not None else params.sweep.asha
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=_searcher(plan, params),
                scheduler=_scheduler(plan, params, asha),
                num_samples=plan.num_samples,
                max_concurrent_trials=plan.max_concurrent,
                reuse_actors=True,  # one worker process (and backbone load) serves many trials
                trial_dirname_creator=_trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=str(storage),
                failure_config=tune.FailureConfig(max_failures=params.sweep.retries),
                callbacks=[EndWatcher(name)],
                verbose=options.verbose,
            ),
        )
    results = tuner.fit()
    fit_seconds = time.perf_counter() - fit_start
    watcher = WATCHERS.pop(name, None)
    ended = watcher.all_ended() if watcher is not None else set()

    children = {r.data.tags.get("sweep.trial_key"): r for r in parent.children()}
    records = _records(results, children, plan, ended)
    outcomes = {}
    for record in records:
        outcomes[record.trial_key] = TrialOutcome(
            state=record.state,
            reason=_reason(record),
            run_name=run_name(record.config),
            params=trial_params(record.config, context),
            tags={"sweep.name": name, "ray.trial_id": record.trial_id, "dataset": record.config["dataset"],
                  "shots": record.config["shots"], "seed": record.config["seed"], "git_commit": commit},
        )
    parent.settle(outcomes)
    children = {r.data.tags.get("sweep.trial_key"): r for r in parent.children()}
    records = _records(results, children, plan, ended)

    results_dir = Path(params.sweep.results_dir).resolve()
    exported = export_contexts(parent.uri, records, results_dir / "contexts", progress=options.verbose > 0)
    log.info("copied %d learned context(s) from MLflow into %s", exported, results_dir / "contexts")
    files = write_results(results_dir, records)
    tally = counts(records)
    # Fewer optuna trials than asked for means Tune stopped early (the searcher caps num_samples itself).
    interrupted = tally["unfinished"] > 0 or len(records) < plan.num_samples
    parent.finish("KILLED" if interrupted else "FINISHED", _parent_metrics(records), files.all())
    if interrupted:
        log.warning("sweep %s interrupted with %d unfinished trial(s); continue it with: "
                    "python -m pipeline.sweep --resume %s", name, tally["unfinished"], name)
    log.info("sweep %s: %s; results in %s", name, ", ".join(f"{v} {k}" for k, v in tally.items()), files.trials.parent)
    return SweepOutcome(name, experiment_path, parent.uri, parent.experiment_id, parent.run_id, records, files,
                        0.0, fit_seconds, interrupted, tally)
