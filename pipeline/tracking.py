"""MLflow tracking: a parent run per sweep, a child run per trial (keyed for resume), and the stages' runs.

The driver resolves the tracking URI (``--tracking-uri`` > ``MLFLOW_TRACKING_URI`` > ``tracking.uri``;
relative SQLite paths are made absolute so trial processes started elsewhere find the same database),
checks within seconds that a tracking server answers, and opens the parent run. Each trial opens its
own child run from inside its worker process, tagged with the trial's deterministic key: a rerun of the
same trial (Ray retry, ``--resume``) finds that run instead of creating a second one, and a run that
already FINISHED is not trained again. The evaluation stages and the report log a `StageRun` each (a
parent run with a child run per result), and find a trial's artifacts with `trial_artifacts`.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import unquote, urlparse

import requests
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run, RunStatus, RunTag
from mlflow.exceptions import MlflowException

from pipeline.errors import UserError
from pipeline.params import TrackingParams

if TYPE_CHECKING:
    from pipeline.params import Params

log = logging.getLogger(__name__)

DEFAULT_URI = "sqlite:///mlflow.db"
PARENT_TAG = "mlflow.parentRunId"
KEY_TAG = "sweep.trial_key"
SWEEP_TAG = "sweep.name"
REASON_TAG = "sweep.failure_reason"
ATTEMPT_TAG = "sweep.attempt"  # 1, 2, ...: a retried or resumed trial logs each attempt into a run of its own
PREVIOUS_ATTEMPT_TAG = "sweep.previous_attempt"  # the run of the attempt before this one
RAY_TRIAL_TAG = "ray.trial_id"
NODE_TAG = "node_ip"
GPU_TAG = "ray.gpu_ids"
STAGE_TAG = "coop.stage"  # which non-sweep stage logged a run: baselines, domain_shift, report
# MLflow 3's kind of experiment: its UI shows a "custom_model_development" experiment as model training
# (runs, charts) rather than as a GenAI app (traces). UIs from 3.x with the GenAI/Model training switch follow
# the switch (remembered per browser) or the page's `workflowType` instead: `runs_page` links with it.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
UI_ADDRESS = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value


class TrackingError(UserError, RuntimeError):
    """The tracking server or database cannot be used; the message says how to fix it."""


def absolute_uri(uri: str, base_dir: Path) -> str:
    """SQLite URIs with a relative path become absolute; every other URI is returned unchanged."""
    prefix = "sqlite:///"
    if uri.startswith(prefix):
        path = uri[len(prefix) :]
        if path and not path.startswith("/") and path != ":memory:":
            return prefix + str((base_dir / path).resolve())
    return uri


def resolve_tracking_uri(cli_uri: str | None, params_uri: str, base_dir: Path | None = None) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else params tracking.uri; SQLite paths made absolute."""
    uri = cli_uri or os.environ.get("MLFLOW_TRACKING_URI") or params_uri or DEFAULT_URI
    return absolute_uri(uri.strip(), base_dir or Path.cwd())


def _server_hint(uri: str) -> str:
    port = urlparse(uri).port or 5000
    return (
        f"start it (e.g. `mlflow server --backend-store-uri sqlite:///$PWD/mlflow.db --host 0.0.0.0 --port {port}`) "
        "or point the sweep elsewhere with --tracking-uri, MLFLOW_TRACKING_URI or tracking.uri "
        f"(the default, {DEFAULT_URI}, needs no server)"
    )


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Fail in seconds, before any trial runs, when the tracking backend cannot be used.

    HTTP(S): one TCP connect and a GET of the server's /health, each bounded by `timeout` (MLflow's own
    client would retry for minutes). SQLite: the database's folder must be creatable.
    """
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        host = parsed.hostname or ""
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            with socket.create_connection((host, port), timeout=timeout):
                pass
        except OSError as error:
            raise TrackingError(
                f"MLflow tracking server {uri} does not answer ({error}); {_server_hint(uri)}."
            ) from None
        health = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(health, timeout=timeout) as response:
                if response.status != 200:
                    raise TrackingError(f"{health} answered HTTP {response.status}; is {uri} an MLflow server?")
        except (urllib.error.URLError, OSError) as error:
            raise TrackingError(
                f"MLflow tracking server {uri} accepted a connection but {health} failed ({error}); "
                f"is it an MLflow server? {_server_hint(uri)}."
            ) from None
    elif parsed.scheme == "sqlite":
        path = uri[len("sqlite:///") :]
        if path and path != ":memory:":
            try:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise TrackingError(f"cannot create the folder of the MLflow database {path}: {error}") from None
    elif parsed.scheme in ("", "file"):
        raise TrackingError(
            f"tracking URI {uri!r} is a file store, which MLflow 3 keeps only in maintenance mode; "
            f"use a SQLite database ({DEFAULT_URI}) or an MLflow server (http://host:5000)"
        )


def artifact_root(uri: str, experiment: str) -> str | None:
    """Where a new experiment keeps artifacts: mlruns/<experiment> beside a SQLite database (not the
    current directory, MLflow's default); None lets a tracking server decide (it proxies uploads)."""
    folder = _artifact_folder(uri, experiment)
    return folder.as_uri() if folder is not None else None


def _artifact_folder(uri: str, experiment: str) -> Path | None:
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///") :]
        if path and path != ":memory:":
            folder = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment)
            return (Path(path).parent / "mlruns" / folder).resolve()
    return None


def _local_path(location: str) -> Path | None:
    """An artifact location on this filesystem as a path (file: URI or plain path); None for s3:, http: etc."""
    parsed = urlparse(location)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "" and location.startswith("/"):
        return Path(location)
    return None


def check_artifact_location(uri: str, name: str, location: str) -> None:
    """An experiment that `artifact_root` placed beside its SQLite database must still be beside it.

    MLflow stores the absolute artifact location once, when it creates the experiment: a database copied or
    moved with its project keeps pointing at the original folder, and every new run would write its artifacts
    there. MLflow offers no way to change an experiment's artifact location, so this stops with what to do.
    A location of any other shape (a server's, an object store's, one chosen by hand) is left alone.
    """
    expected = _artifact_folder(uri, name)
    stored = _local_path(location)
    if expected is None or stored is None or stored.parent.name != "mlruns" or stored.name != expected.name:
        return
    if stored.resolve() == expected:
        return
    database = uri[len("sqlite:///") :]
    raise TrackingError(
        f"MLflow experiment {name!r} in {database} keeps its artifacts in {stored}, not beside the database "
        f"({expected}): the database was copied or moved from {stored.parent.parent}, and new runs would write "
        f"their artifacts into that folder (MLflow cannot change an experiment's artifact location). Either "
        f"set tracking.experiment to a new name (its artifacts then go to {expected.parent}/<name>), or start "
        f"this copy's tracking afresh by moving {database} and {expected.parent} out of the way."
    )


def get_or_create_experiment(client: MlflowClient, name: str, uri: str) -> str:
    """The experiment's id, created if needed with its artifacts beside a SQLite database and tagged as model
    training (`EXPERIMENT_KIND`); an existing one is checked (`check_artifact_location`) and gets the tag if it
    has no kind yet."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_root(uri, name),
                                            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException:
            # Another process created it between our lookup and create.
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        raise TrackingError(
            f"MLflow experiment {name!r} is deleted; restore it (`mlflow experiments restore`) "
            "or set tracking.experiment to another name"
        )
    check_artifact_location(uri, name, experiment.artifact_location)
    if EXPERIMENT_KIND_TAG not in experiment.tags:  # a kind the user chose stays
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment.experiment_id


def runs_page(uri: str, experiment_id: str) -> str:
    """The MLflow UI page listing the experiment's runs, in the model-training view: on the tracking server
    itself, or for a SQLite database where `mlflow ui` serves it by default."""
    base = uri.rstrip("/") if urlparse(uri).scheme in ("http", "https") else UI_ADDRESS
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def git_commit(cwd: Path | None = None) -> str:
    """HEAD of the checkout holding this code (default), '+dirty' when tracked files changed; 'unknown' outside git."""
    cwd = cwd or Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd, capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def _params(values: dict[str, Any]) -> list[Param]:
    return [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in sorted(values.items())]


def _tags(values: dict[str, Any]) -> list[RunTag]:
    return [RunTag(k, str(v)) for k, v in sorted(values.items())]


def _now_ms() -> int:
    return int(time.time() * 1000)


def child_runs(client: MlflowClient, experiment_id: str, parent_run_id: str) -> list[Run]:
    """Every child run of a sweep's parent run (all pages)."""
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
            max_results=1000,
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def attempt_of(run: Run) -> int:
    return int(run.data.tags.get(ATTEMPT_TAG, "1"))


def latest_attempts(runs: Iterable[Run]) -> dict[str, Run]:
    """Trial key -> the run of its latest attempt (a FINISHED one if any: it ends the trial)."""
    latest: dict[str, Run] = {}
    for run in runs:
        key = run.data.tags.get(KEY_TAG)
        if key is None:
            continue
        rank = (run.info.status == "FINISHED", attempt_of(run), run.info.start_time or 0)
        held = latest.get(key)
        if held is None or rank > (held.info.status == "FINISHED", attempt_of(held), held.info.start_time or 0):
            latest[key] = run
    return latest


@dataclass
class SweepRun:
    """The parent run of one sweep, on the driver."""

    client: MlflowClient
    experiment_id: str
    run_id: str
    uri: str

    @classmethod
    def start(
        cls, uri: str, experiment: str, name: str, params: dict[str, Any], tags: dict[str, Any]
    ) -> SweepRun:
        client = MlflowClient(uri)
        experiment_id = get_or_create_experiment(client, experiment, uri)
        run = client.create_run(experiment_id, run_name=name, tags={SWEEP_TAG: name, **{k: str(v) for k, v in tags.items()}})
        client.log_batch(run.info.run_id, params=_params(params))
        if uri.startswith("sqlite:"):
            log.info("MLflow: browse the runs with `mlflow ui --backend-store-uri %s`, then open %s", uri,
                     runs_page(uri, experiment_id))
        else:
            log.info("MLflow: the runs are at %s", runs_page(uri, experiment_id))
        return cls(client, experiment_id, run.info.run_id, uri)

    @classmethod
    def reopen(cls, uri: str, run_id: str) -> SweepRun:
        """The parent run of an interrupted sweep, set running again."""
        client = MlflowClient(uri)
        try:
            run = client.get_run(run_id)
        except MlflowException as error:
            raise TrackingError(
                f"the sweep's parent run {run_id} is not in {uri} ({error}); resume with the same tracking URI"
            ) from None
        client.update_run(run_id, status="RUNNING")
        return cls(client, run.info.experiment_id, run_id, uri)

    def children(self) -> list[Run]:
        return child_runs(self.client, self.experiment_id, self.run_id)

    def trial_runs(self) -> dict[str, Run]:
        """Trial key -> the run of its latest attempt."""
        return latest_attempts(self.children())

    def close_orphans(self, reason: str) -> int:
        """End every child run still RUNNING as KILLED with `reason` (their processes are gone); how many."""
        orphans = [r for r in self.children() if r.info.status == "RUNNING"]
        for run in orphans:
            self.client.set_tag(run.info.run_id, REASON_TAG, reason[:5000])
            self.client.set_terminated(run.info.run_id, "KILLED")
        return len(orphans)

    def settle(self, outcomes: dict[str, TrialOutcome]) -> None:
        """Make every trial's child run agree with Ray's final word on it.

        A worker that crashed or was stopped (ASHA, interruption) cannot close its own run; a trial that
        failed before it reached MLflow has none. Runs still RUNNING get FAILED or KILLED with the reason;
        a failed trial without a run gets one, so every failure is visible in MLflow.
        """
        runs = self.trial_runs()
        for key, outcome in outcomes.items():
            run = runs.get(key)
            if run is None:
                if outcome.state != "FAILED":
                    continue
                run = self.client.create_run(
                    self.experiment_id,
                    run_name=outcome.run_name,
                    tags={PARENT_TAG: self.run_id, KEY_TAG: key, **{k: str(v) for k, v in outcome.tags.items()}},
                )
                self.client.log_batch(run.info.run_id, params=_params(outcome.params))
            elif run.info.status != "RUNNING":
                if outcome.state == "STOPPED" and run.info.status == "KILLED" and outcome.reason:
                    # The worker only knew Tune stopped it; the driver knows it was the scheduler.
                    self.client.set_tag(run.info.run_id, REASON_TAG, outcome.reason[:5000])
                continue
            status = "FAILED" if outcome.state == "FAILED" else "KILLED" if outcome.state != "FINISHED" else "FINISHED"
            if outcome.reason:
                self.client.set_tag(run.info.run_id, REASON_TAG, outcome.reason[:5000])
            self.client.set_terminated(run.info.run_id, status)
        # Earlier attempts whose process ended without closing them (a lost node, a killed worker).
        self.close_orphans("an earlier attempt of this trial whose process ended without closing its run (a lost "
                           "node or a killed worker); the trial's latest attempt is the run to read")

    def finish(self, status: str, metrics: dict[str, float], artifacts: Iterable[Path] = ()) -> None:
        timestamp = _now_ms()
        batch = [Metric(k, float(v), timestamp, 0) for k, v in sorted(metrics.items())]
        for start in range(0, len(batch), 500):  # MLflow caps a batch at 1000 entries
            self.client.log_batch(self.run_id, metrics=batch[start : start + 500])
        for path in artifacts:
            if path.is_file():
                self.client.log_artifact(self.run_id, str(path), artifact_path="results")
        self.client.set_terminated(self.run_id, status)


@dataclass
class TrialOutcome:
    """Ray's verdict on one trial, as the driver hands it to `SweepRun.settle`."""

    state: str  # FINISHED | FAILED | STOPPED | UNFINISHED
    reason: str = ""
    run_name: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------ a trial riding out a tracking-server outage

T = TypeVar("T")
# MLflow's HTTP client retries a failed request itself (7 times, backoff factor 2: minutes per request) and waits
# 120 s for an answer: inside a trial, every metric flush during an outage would stall training that long, and
# the outage would stay invisible to us. Trial processes turn that down (`bound_http_retries`) and retry in
# `OutageGuard` instead, which lets training go on and knows when to give up (tracking.outage_limit_s).
TRIAL_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
MAX_RETRY_DELAY_S = 10.0  # backoff between tries while the server is down: 1, 2, 4, 8, then every 10 s
TRANSIENT_HTTP_STATUS = frozenset({408, 429, 500, 502, 503, 504})  # the answers MLflow's client retries
TRANSIENT_ERROR_CODES = frozenset({"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"})  # MLflow's 503 and 429
TRANSIENT_ERRORS = (requests.ConnectionError, requests.Timeout, requests.exceptions.RetryError,
                    requests.exceptions.ChunkedEncodingError, ConnectionError, TimeoutError)


def bound_http_retries() -> None:
    """Set `TRIAL_HTTP_ENV` in this process unless its environment already chose; MLflow reads them per request."""
    for name, value in TRIAL_HTTP_ENV.items():
        os.environ.setdefault(name, value)


def server_unreachable(error: BaseException) -> bool:
    """Whether `error` (or an error it was raised from) says the tracking server did not answer or could not
    answer just then: connection refused or reset, a timeout, HTTP 408/429/5xx. An answer such as a 4xx (a bad
    value, a missing or closed run) is a real error, and retrying it would not help."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, requests.HTTPError) and current.response is not None:
            return current.response.status_code in TRANSIENT_HTTP_STATUS
        if isinstance(current, TRANSIENT_ERRORS):
            return True
        if isinstance(current, MlflowException) and current.error_code in TRANSIENT_ERROR_CODES:
            return True
        current = current.__cause__ or current.__context__  # MLflow wraps the requests error it caught
    return False


def _root_cause(error: BaseException, limit: int = 200) -> str:
    """The innermost error `error` was raised from, on one line ("ConnectionRefusedError: [Errno 111] ...")."""
    seen = {id(error)}
    while (inner := error.__cause__ or error.__context__) is not None and id(inner) not in seen:
        seen.add(id(inner))
        error = inner
    return " ".join(f"{type(error).__name__}: {error}".split())[:limit]


class OutageGuard:
    """A trial's requests to its tracking server, retried while the server does not answer.

    An outage starts at the first request that finds the server unreachable (`server_unreachable`) and ends at
    the next one that gets through; a warning marks each end. `call` waits between tries (backoff 1, 2, 4, 8,
    then 10 s); `try_call` never waits: while the server is down it tries only when the next try is due and
    otherwise returns False at once, so training goes on. A try that fails `limit_s` or more after the outage
    started raises TrackingError, and so does every request after it: the run is left to the driver, which
    settles it once the server is back. Real errors are raised at once.
    """

    def __init__(self, uri: str, limit_s: float = TrackingParams.outage_limit_s) -> None:
        self.uri = uri
        self.limit_s = limit_s
        self.since: float | None = None  # time.monotonic() of the current outage's first failed request
        self.next_try = 0.0
        self.delay = 0.0
        self.gave_up = ""  # the TrackingError's message once the limit has passed
        self.outages: list[float] = []  # seconds each outage ridden out lasted

    def call(self, what: str, request: Callable[[], T], held: int = 0) -> T:
        """`request()`'s result, waiting out an outage for up to the limit; `what` names the request in messages,
        `held` is how many metric rows wait on it (for the log)."""
        while True:
            self._check()
            if self.since is not None:
                time.sleep(max(0.0, self.next_try - time.monotonic()))
            try:
                value = request()
            except Exception as error:
                if not server_unreachable(error):
                    raise
                self._failed(what, error)
                continue
            self._answered(held)
            return value

    def try_call(self, what: str, request: Callable[[], object], held: int = 0) -> bool:
        """Run `request` unless the server is down and its next try is not due yet; whether it got through."""
        self._check()
        if self.since is not None and time.monotonic() < self.next_try:
            return False
        try:
            request()
        except Exception as error:
            if not server_unreachable(error):
                raise
            self._failed(what, error)
            return False
        self._answered(held)
        return True

    def _check(self) -> None:
        if self.gave_up:
            raise TrackingError(self.gave_up)

    def _failed(self, what: str, error: Exception) -> None:
        now = time.monotonic()
        if self.since is None:
            self.since, self.delay = now, 1.0
            log.warning("MLflow tracking server %s does not answer (%s: %s); the trial goes on and holds its "
                        "metrics, retrying for up to %g s (tracking.outage_limit_s)",
                        self.uri, what, _root_cause(error), self.limit_s)
        else:
            self.delay = min(2 * self.delay, MAX_RETRY_DELAY_S)
        down = now - self.since
        if down >= self.limit_s:
            # One line, the essentials first: Ray's error and trials.csv's reason column keep its start.
            self.gave_up = (f"MLflow tracking server {self.uri} has not answered for {down:.1f} s, reaching "
                            f"tracking.outage_limit_s ({self.limit_s:g} s): check the server, or raise "
                            f"tracking.outage_limit_s to ride out longer outages (last error, on {what}: "
                            f"{_root_cause(error, 120)})")
            log.error("%s", self.gave_up)
            raise TrackingError(self.gave_up) from None
        self.next_try = min(now + self.delay, self.since + self.limit_s)  # the last try falls on the limit

    def _answered(self, held: int) -> None:
        if self.since is None:
            return
        down = time.monotonic() - self.since
        self.outages.append(down)
        self.since, self.delay = None, 0.0
        log.warning("MLflow tracking server %s answers again after %.1f s; sending the %d metric row(s) held "
                    "meanwhile", self.uri, down, held)


class TrialRun:
    """One trial's child run, used from inside the trial's worker process.

    Its requests go through `server` (an OutageGuard): while the tracking server is down, metrics are held in
    order and training goes on; `log_artifacts` and `close` wait for the server, up to the outage limit.
    """

    def __init__(self, client: MlflowClient, run: Run, server: OutageGuard | None = None) -> None:
        self.client = client
        self.run_id = run.info.run_id
        self.server = server or OutageGuard(client.tracking_uri)
        self._pending: list[Metric] = []
        self.closed = False

    @classmethod
    def open(
        cls,
        uri: str,
        experiment_id: str,
        parent_run_id: str,
        key: str,
        run_name: str,
        params: dict[str, Any],
        tags: dict[str, Any],
    ) -> tuple[TrialRun | None, Run | None]:
        """(run to log into, None), or (None, finished run) when this trial already FINISHED.

        A trial with unfinished runs (crash, Ray retry, interrupted sweep) gets a new run for this attempt,
        tagged with its attempt number and the previous attempt's run; one still RUNNING is closed FAILED.
        """
        if uri.startswith("sqlite:///"):
            db = Path(uri[len("sqlite:///") :])
            if not db.is_file():
                # A worker on another machine would silently start an empty database of its own.
                raise TrackingError(
                    f"the tracking database {db} is not on this node ({socket.gethostname()}); trials on other "
                    "machines need an MLflow server: see docs/cluster.md and pass --tracking-uri http://host:5000"
                )
        client = MlflowClient(uri)
        found = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}' and tags.`{KEY_TAG}` = '{key}'",
            order_by=["attributes.start_time ASC"],
        )
        finished = [r for r in found if r.info.status == "FINISHED"]
        if finished:
            return None, finished[0]
        # Each attempt logs into a run of its own, so a retried or resumed trial's curves never repeat; the
        # earlier attempt's run stays, closed and linked (its curves show where it stopped).
        previous = max(found, key=lambda r: (attempt_of(r), r.info.start_time or 0), default=None)
        attempt = attempt_of(previous) + 1 if previous is not None else 1
        run_tags = {PARENT_TAG: parent_run_id, KEY_TAG: key, ATTEMPT_TAG: str(attempt)}
        if previous is not None:
            run_tags[PREVIOUS_ATTEMPT_TAG] = previous.info.run_id
            run_name = f"{run_name} (attempt {attempt})"
        run = client.create_run(experiment_id, run_name=run_name, tags=run_tags)
        client.log_batch(run.info.run_id, params=_params(params),
                         tags=_tags({k: str(v) for k, v in tags.items()}))
        for earlier in found:
            if earlier.info.status == "RUNNING":  # its process ended without closing it
                client.set_tag(earlier.info.run_id, REASON_TAG,
                               f"attempt {attempt_of(earlier)} ended without closing its run (its process was "
                               f"lost); attempt {attempt} continues in run {run.info.run_id}")
                client.set_terminated(earlier.info.run_id, "FAILED")
        if previous is not None:
            log.info("trial %s: attempt %d in a new MLflow run %s (previous: %s)", key, attempt, run.info.run_id,
                     previous.info.run_id)
        return cls(client, run), None

    def log_metrics(self, metrics: dict[str, float | None], step: int, flush: bool = False) -> None:
        timestamp = _now_ms()
        self._pending += [Metric(k, float(v), timestamp, step) for k, v in metrics.items() if v is not None]
        if flush or len(self._pending) >= 200:
            self._send(wait=False)  # during an outage the rows stay held and training goes on

    def flush(self) -> None:
        """Send every held metric row, waiting out an outage (up to the limit)."""
        self._send(wait=True)

    def _send(self, wait: bool) -> None:
        while self._pending:
            batch = self._pending[:1000]  # MLflow's cap per batch; rows leave the buffer once they got through
            request = functools.partial(self.client.log_batch, self.run_id, metrics=batch)
            if wait:
                self.server.call("log_batch", request, held=len(self._pending))
            elif not self.server.try_call("log_batch", request, held=len(self._pending)):
                return
            del self._pending[: len(batch)]

    def log_artifacts(self, folder: Path) -> None:
        # A retried upload writes the same files again: nothing is duplicated.
        self.server.call("log_artifacts", lambda: self.client.log_artifacts(self.run_id, str(folder)))

    def close(self, status: str, reason: str = "") -> None:
        """End the run FINISHED, FAILED or KILLED; `reason` becomes the sweep.failure_reason tag."""
        if self.closed:
            return
        try:
            self.flush()
        finally:
            if reason:
                self.server.call("set_tag", lambda: self.client.set_tag(self.run_id, REASON_TAG, reason[:5000]))
            end = RunStatus.to_string(RunStatus.from_string(status))
            self.server.call("set_terminated", lambda: self.client.set_terminated(self.run_id, end))
            self.closed = True


def backbone_label(arch: str, pretrained: str | None) -> str:
    """A backbone as runs and result tables name it: "<arch>/<weights>", the weights being an open_clip tag, a
    checkpoint's file name (however the path to it was spelled; the path itself is in the trials' params and
    the context files) or "random" for random weights."""
    if not pretrained:
        return f"{arch}/random"
    if "/" in pretrained or os.sep in pretrained or pretrained.endswith(CHECKPOINT_SUFFIXES):
        return f"{arch}/{Path(pretrained).name}"
    return f"{arch}/{pretrained}"


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
        check_tracking_uri(uri, timeout=params.tracking.check_timeout_s)
        client = MlflowClient(uri)
        experiment_id = get_or_create_experiment(client, params.tracking.experiment, uri)
        run = client.create_run(experiment_id, run_name=name,
                                tags={STAGE_TAG: stage, "git_commit": git_commit(),
                                      "backbone": backbone_label(params.backbone.arch, params.backbone.pretrained)})
        client.log_batch(run.info.run_id, params=_params(run_params))
        return cls(client, experiment_id, run.info.run_id)

    def child(self, name: str, run_params: dict[str, Any], metrics: dict[str, float | None],
              tags: dict[str, Any]) -> str:
        run = self.client.create_run(self.experiment_id, run_name=name,
                                     tags={PARENT_TAG: self.run_id, **{k: str(v) for k, v in tags.items()}})
        now = run.info.start_time
        self.client.log_batch(
            run.info.run_id,
            params=_params(run_params),
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
