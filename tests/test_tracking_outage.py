"""A tracking-server outage during a sweep: trials keep training, hold their metrics and send them when the server
answers again; an outage longer than tracking.outage_limit_s fails the trials it hits, with that reason.

The fast tests drive `TrialRun` and `OutageGuard` against a closed loopback port, raw HTTP listeners that answer
503 or 400, and a SQLite store standing for the server once it is back. The slow ones stop a real `mlflow server`
by its process group mid-sweep (real Ray Tune, real trials) and start it again on the same port and store.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from sweep_helpers import PYTHON, DemoWorkspace, free_port, group_members, http_ok, stop_group, wait_for

from pipeline.params import ParamsError, load_params
from pipeline.sweep.tuner import SweepOptions, run_sweep
from pipeline.tracking import (
    KEY_TAG,
    PARENT_TAG,
    REASON_TAG,
    TRIAL_HTTP_ENV,
    OutageGuard,
    SweepRun,
    TrackingError,
    TrialRun,
    bound_http_retries,
    server_unreachable,
)

# ----------------------------------------------------------------------------------------------- helpers


@pytest.fixture
def trial_http_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """What `bound_http_retries` sets in a trial's process, undone after the test (the driver keeps MLflow's)."""
    for name, value in TRIAL_HTTP_ENV.items():
        monkeypatch.setenv(name, value)


@contextlib.contextmanager
def http_listener(status: int, body: bytes) -> Iterator[str]:
    """A loopback socket that answers every HTTP request with `status` and `body` (a proxy in front of a
    restarting server answers 503; a server refusing a request answers 4xx); yields its address."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(2)
                with contextlib.suppress(OSError):
                    conn.recv(65536)
                    conn.sendall(f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: "
                                 f"{len(body)}\r\nConnection: close\r\n\r\n".encode() + body)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        server.close()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> SweepRun:
    """A sweep's parent run in a SQLite store: the tracking server as it is when it answers (one store for the
    module: MLflow takes seconds to create one)."""
    return SweepRun.start(f"sqlite:///{tmp_path_factory.mktemp('store')}/mlflow.db", "outage", "sweep", {}, {})


def opened_run(store: SweepRun, key: str) -> tuple[TrialRun, MlflowClient]:
    """A trial's run opened in the store, and the store's client."""
    run, _ = TrialRun.open(store.uri, store.experiment_id, store.run_id, key, key, {}, {})
    assert run is not None
    return run, store.client


def cut_off(run: TrialRun, limit_s: float) -> str:
    """Point the trial's run at a closed loopback port: the server is down. Returns that address."""
    down = f"http://127.0.0.1:{free_port()}"
    run.client = MlflowClient(down)
    run.server = OutageGuard(down, limit_s)
    return down


def loss_steps(client: MlflowClient, run_id: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, "loss"))


# ------------------------------------------------------------------------------------ fast: no server at all


@pytest.mark.parametrize("value", ["0", "-1", ".nan"])
def test_outage_limit_must_be_positive(tmp_path: Path, value: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(f"tracking:\n  outage_limit_s: {value}\n")
    with pytest.raises(ParamsError, match=r"tracking\.outage_limit_s must be > 0"):
        load_params(path)
    path.write_text("tracking:\n  outage_limit_s: 5\n")
    assert load_params(path).tracking.outage_limit_s == 5


def test_trials_turn_mlflows_own_retries_down_unless_the_environment_chose() -> None:
    saved = {name: os.environ.pop(name, None) for name in TRIAL_HTTP_ENV}
    try:  # this process is the sweeps' driver too: it must keep MLflow's retries afterwards
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "33"
        bound_http_retries()
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "33"
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value


def test_an_unreachable_server_is_told_from_a_real_error(store: SweepRun, trial_http_env: None) -> None:
    metric = [Metric("loss", 1.0, 0, 1)]
    run_id = "0" * 32

    def error_of(uri: str) -> Exception:
        with pytest.raises(Exception) as info:
            MlflowClient(uri).log_batch(run_id, metrics=metric)
        return info.value

    start = time.monotonic()
    refused = error_of(f"http://127.0.0.1:{free_port()}")  # nothing listens: connection refused
    assert time.monotonic() - start < 3, "MLflow's own retries must be off in trials"
    assert isinstance(refused, MlflowException) and server_unreachable(refused)

    with http_listener(503, b'{"error_code": "TEMPORARILY_UNAVAILABLE", "message": "restarting"}') as uri:
        assert server_unreachable(error_of(uri))
    with http_listener(400, b'{"error_code": "INVALID_PARAMETER_VALUE", "message": "bad metric"}') as uri:
        bad_request = error_of(uri)
        assert "bad metric" in str(bad_request) and not server_unreachable(bad_request)
    missing_run = error_of(store.uri)  # a store that answers: no such run
    assert not server_unreachable(missing_run)

    # A real error is raised at once, never retried and never taken for an outage.
    guard = OutageGuard("http://server", limit_s=60)
    with http_listener(400, b'{"error_code": "INVALID_PARAMETER_VALUE", "message": "bad metric"}') as uri:
        start = time.monotonic()
        with pytest.raises(MlflowException, match="bad metric"):
            guard.call("log_batch", lambda: MlflowClient(uri).log_batch(run_id, metrics=metric))
        assert time.monotonic() - start < 3 and guard.since is None


def test_a_trial_holds_its_metrics_through_an_outage_and_sends_them_in_order(
        store: SweepRun, trial_http_env: None, caplog: pytest.LogCaptureFixture) -> None:
    run, client = opened_run(store, "held")
    run.log_metrics({"loss": 3.0}, step=1, flush=True)
    down = cut_off(run, limit_s=60)
    caplog.set_level(logging.WARNING, logger="pipeline.tracking")
    slowest = 0.0
    for epoch in range(2, 12):  # the server is down: each epoch logs and flushes, and training goes on
        start = time.monotonic()
        run.log_metrics({"loss": 3.0 / epoch, "val_acc": 10.0 * epoch}, step=epoch, flush=True)
        slowest = max(slowest, time.monotonic() - start)
        time.sleep(0.05)
    assert slowest < 1.0, f"a metric flush during the outage held training for {slowest:.2f} s"
    assert len(run._pending) == 20
    starts = [r for r in caplog.records if "does not answer" in r.getMessage()]
    assert len(starts) == 1 and down in starts[0].getMessage() and "tracking.outage_limit_s" in starts[0].getMessage()

    run.client = client  # the server is back: the next flush that is due sends what was held, training on
    epoch = 12
    while run._pending:
        run.log_metrics({"loss": 3.0 / epoch, "val_acc": 10.0 * epoch}, step=epoch, flush=True)
        epoch += 1
        time.sleep(0.1)
    assert epoch < 40, "the held metrics went out only after many epochs"
    ends = [r.getMessage() for r in caplog.records if "answers again" in r.getMessage()]
    assert len(ends) == 1 and "metric row(s) held" in ends[0]
    assert int(ends[0].split("sending the ")[1].split()[0]) >= 20
    assert len(run.server.outages) == 1 and 0.5 < run.server.outages[0] < 10
    run.close("FINISHED")
    assert loss_steps(client, run.run_id) == list(range(1, epoch))
    assert sorted(m.step for m in client.get_metric_history(run.run_id, "val_acc")) == list(range(2, epoch))
    assert client.get_run(run.run_id).info.status == "FINISHED"


def test_an_outage_past_the_limit_fails_the_trial_saying_why(store: SweepRun, trial_http_env: None) -> None:
    limit = 1.5
    run, client = opened_run(store, "training")
    down = cut_off(run, limit)
    start = time.monotonic()
    run.log_metrics({"loss": 1.0}, step=1, flush=True)  # the outage starts; training goes on
    assert time.monotonic() - start < 1
    time.sleep(limit + 0.1)
    with pytest.raises(TrackingError) as info:  # the first log after the limit tries once more and gives up
        run.log_metrics({"loss": 0.9}, step=2, flush=True)
    failed_after = time.monotonic() - start
    assert limit <= failed_after < limit + 1.5
    message = str(info.value)
    assert down in message and "tracking.outage_limit_s (1.5 s)" in message and "\n" not in message
    start = time.monotonic()
    with pytest.raises(TrackingError):  # closing does not wait a second time: the driver settles the run
        run.close("FAILED", "TrackingError: " + message)
    assert time.monotonic() - start < 0.5

    # Closing (the final flush, artifacts, the end status) waits for the server, up to the limit.
    run, client = opened_run(store, "closing")
    cut_off(run, limit)
    run.log_metrics({"loss": 1.0}, step=1)
    start = time.monotonic()
    with pytest.raises(TrackingError, match="has not answered"):
        run.close("FINISHED")
    assert limit <= time.monotonic() - start < limit + 1.5
    assert client.get_run(run.run_id).info.status == "RUNNING"  # left to the driver's settle


# ------------------------------------------------------------------- slow: a real server, stopped and restarted


class RestartableServer:
    """A real `mlflow server` on a fixed loopback port and SQLite store, stopped (its whole process group) and
    started again on the same port and store."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.startup_s = 0.0  # how long the last start took to answer
        self.closed = False  # set at the fixture's teardown: a test's restarting thread must not start it again
        self.lock = threading.Lock()
        folder.mkdir(parents=True, exist_ok=True)

    def start(self, wait: bool = True) -> None:
        with self.lock:
            assert not self.closed, "the server's fixture has ended"
            self.started = time.monotonic()
            with (self.folder / "mlflow-server.log").open("a") as log:
                self.proc = subprocess.Popen(
                    [str(Path(PYTHON).parent / "mlflow"), "server", "--backend-store-uri",
                     f"sqlite:///{self.folder}/server.db", "--artifacts-destination", str(self.folder / "artifacts"),
                     "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
                    cwd=self.folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                )
        if wait:
            self.wait_up()

    def wait_up(self) -> None:
        proc = self.proc
        assert proc is not None
        wait_for(lambda: http_ok(f"{self.uri}/health") or proc.poll() is not None, 180, 0.2, "mlflow server")
        assert proc.poll() is None, (self.folder / "mlflow-server.log").read_text()[-3000:]
        self.startup_s = time.monotonic() - self.started

    def stop(self, close: bool = False) -> None:
        with self.lock:
            self.closed = self.closed or close
            if self.proc is not None:
                stop_group(self.proc)
                assert not group_members(self.proc.pid), "mlflow server processes survived"
                self.proc = None


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RestartableServer]:
    server = RestartableServer(tmp_path_factory.mktemp("outage-server"))
    server.start()
    try:
        yield server
    finally:
        server.stop(close=True)


@pytest.fixture(scope="module")
def ray_session() -> Iterator[None]:
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def trial_runs(uri: str, experiment: str) -> list[Any]:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=100) if exp else []
    return [r for r in runs if PARENT_TAG in r.data.tags]


def losses_logged(uri: str, experiment: str) -> list[int]:
    """Loss rows each trial's run holds so far; [] while the server does not answer."""
    try:
        client = MlflowClient(uri)
        return [len(client.get_metric_history(r.info.run_id, "loss")) for r in trial_runs(uri, experiment)]
    except Exception:  # the experiment is not there yet
        return []


def outage_params(ws: DemoWorkspace, name: str, epochs: int, limit_s: float, uri: str) -> Any:
    root = ws.root / name
    return load_params(ws.params(
        name,
        data={"shots": [1]},  # two trials: seeds 1 and 2, run at once
        train={"epochs": epochs, "eval_every": 1},  # every epoch logs and flushes its metrics
        sweep={"max_concurrent": 2, "retries": 0, "storage": str(root / "ray"), "results_dir": str(root / "results"),
               "name": name},
        tracking={"uri": uri, "experiment": name, "outage_limit_s": limit_s},
    ))


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def in_background(work: Any) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def guarded() -> None:
        try:
            work()
        except BaseException as error:  # reported by the test after the sweep
            errors.append(error)

    thread = threading.Thread(target=guarded, daemon=True)
    thread.start()
    return thread, errors


@pytest.mark.slow
def test_a_sweep_rides_out_a_server_restart_and_loses_nothing(demo_ws: DemoWorkspace, ray_session: None,
                                                              server: RestartableServer) -> None:
    """Stop the server once both trials have logged a few epochs, start it again on the same port and store
    so that it answers about 30 s after the stop (longer when its start-up alone takes longer): both trials
    finish, each run holds every epoch's loss once, and rows logged while the server was down are among them."""
    epochs, name = 150, "outage-restart"
    params = outage_params(demo_ws, name, epochs, limit_s=120, uri=server.uri)
    window: dict[str, float] = {}

    def restart_mid_sweep() -> None:
        wait_for(lambda: len(losses_logged(server.uri, name)) == 2 and min(losses_logged(server.uri, name)) >= 5,
                 180, 0.5, "both trials training")
        window["stop"] = time.time()
        server.stop()
        time.sleep(max(0.0, 30 - server.startup_s))
        server.start()
        window["up"] = time.time()

    controller, errors = in_background(restart_mid_sweep)
    start = time.monotonic()
    outcome = run_sweep(params, SweepOptions(verbose=0))
    sweep_seconds = time.monotonic() - start
    controller.join(200)
    assert not errors, errors
    assert "up" in window, "the sweep ended before the server was restarted: trials too short"
    down = window["up"] - window["stop"]
    assert down >= 20

    assert outcome.counts["finished"] == 2 and outcome.counts["failed"] == 0
    assert {r["state"] for r in read_csv(outcome.files.trials)} == {"FINISHED"}
    client = MlflowClient(server.uri)
    runs = trial_runs(server.uri, name)
    assert len(runs) == 2
    held = {}
    for run in runs:
        assert run.info.status == "FINISHED"
        history = client.get_metric_history(run.info.run_id, "loss")
        assert sorted(m.step for m in history) == list(range(1, epochs + 1))  # none missing, none twice
        during = [m for m in history if window["stop"] * 1000 <= m.timestamp < window["up"] * 1000]
        assert during, "no epoch was trained while the server was down"
        held[run.data.tags[KEY_TAG]] = len(during)
        assert "ctx.safetensors" in {a.path for a in client.list_artifacts(run.info.run_id)}
    logging.getLogger(__name__).warning("server down %.1f s; loss rows logged meanwhile and sent later: %s; "
                                        "sweep %.0f s", down, held, sweep_seconds)

    # A request the server refuses is a real error: raised at once, not retried as an outage.
    guard = OutageGuard(server.uri, limit_s=60)
    with pytest.raises(MlflowException):
        guard.call("log_batch", lambda: client.log_batch("0" * 32, metrics=[Metric("loss", 1.0, 0, 1)]))
    assert guard.since is None and not guard.outages


@pytest.mark.slow
def test_a_server_down_past_the_limit_fails_the_trials_and_the_sweep_says_so(
        demo_ws: DemoWorkspace, ray_session: None, server: RestartableServer) -> None:
    """tracking.outage_limit_s: 5. The server stops while both trials train and starts again only once both
    have failed: they fail about 5 s after the stop, naming the limit. The driver, whose own MLflow client keeps
    MLflow's retries (minutes), meets the server down when it settles the runs and does so once it is back."""
    limit, name = 5, "outage-limit"
    params = outage_params(demo_ws, name, 400, limit_s=limit, uri=server.uri)
    trial_dirs = Path(params.sweep.storage) / name
    marks: dict[str, Any] = {}

    def stop_and_restart_slowly() -> None:
        wait_for(lambda: len(losses_logged(server.uri, name)) == 2 and min(losses_logged(server.uri, name)) >= 3,
                 180, 0.5, "both trials training")
        marks["stop"] = time.time()
        server.stop()
        wait_for(lambda: len(list(trial_dirs.glob("*/error.txt"))) == 2, 120, 0.2, "both trials to fail")
        marks["failed"] = [p.stat().st_mtime for p in trial_dirs.glob("*/error.txt")]
        server.start()
        marks["up"] = time.time()

    controller, errors = in_background(stop_and_restart_slowly)
    start = time.monotonic()
    outcome = run_sweep(params, SweepOptions(verbose=0))
    sweep_seconds = time.monotonic() - start
    controller.join(200)
    assert not errors, errors
    fail_after = [t - marks["stop"] for t in marks["failed"]]
    assert all(limit <= s < limit + 15 for s in fail_after), fail_after
    assert sweep_seconds < 240, f"the driver took {sweep_seconds:.0f} s"

    assert outcome.counts["failed"] == 2 and outcome.counts["finished"] == 0
    rows = read_csv(outcome.files.trials)
    assert [r["state"] for r in rows] == ["FAILED", "FAILED"]
    for row in rows:
        assert "TrackingError" in row["reason"] and "tracking.outage_limit_s (5 s)" in row["reason"], row["reason"]
        assert server.uri in row["reason"]
    runs = trial_runs(server.uri, name)
    assert len(runs) == 2
    for run in runs:
        assert run.info.status == "FAILED" and "tracking.outage_limit_s" in run.data.tags[REASON_TAG]
        assert len(MlflowClient(server.uri).get_metric_history(run.info.run_id, "loss")) >= 3
    logging.getLogger(__name__).warning("limit %d s: trials failed %s s after the stop; server back after %.0f s; "
                                        "sweep %.0f s", limit, [round(s, 1) for s in fail_after],
                                        marks["up"] - marks["stop"], sweep_seconds)
