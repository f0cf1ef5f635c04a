"""MLflow tracking: URI resolution, fast failure on a dead server, and one run per trial across retries and
resumes (real MLflow on SQLite)."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from sweep_helpers import free_port

from pipeline.tracking import (
    ATTEMPT_TAG,
    KEY_TAG,
    PARENT_TAG,
    REASON_TAG,
    SweepRun,
    TrackingError,
    TrialOutcome,
    TrialRun,
    absolute_uri,
    check_tracking_uri,
    resolve_tracking_uri,
)


def test_relative_sqlite_uri_becomes_absolute(tmp_path: Path) -> None:
    assert absolute_uri("sqlite:///mlflow.db", tmp_path) == f"sqlite:///{tmp_path}/mlflow.db"
    assert absolute_uri("sqlite:///sub/../x.db", tmp_path) == f"sqlite:///{tmp_path}/x.db"
    assert absolute_uri("sqlite:////abs/x.db", tmp_path) == "sqlite:////abs/x.db"
    assert absolute_uri("http://h:5000", tmp_path) == "http://h:5000"


def test_uri_precedence_cli_then_env_then_params(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None, "sqlite:///p.db", tmp_path) == f"sqlite:///{tmp_path}/p.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert resolve_tracking_uri(None, "sqlite:///p.db", tmp_path) == "http://env:5000"
    assert resolve_tracking_uri("sqlite:///cli.db", "sqlite:///p.db", tmp_path) == f"sqlite:///{tmp_path}/cli.db"


def test_dead_server_fails_in_seconds() -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(TrackingError, match="does not answer") as info:
        check_tracking_uri(uri, timeout=2)
    assert time.monotonic() - start < 5
    assert uri in str(info.value) and "mlflow server" in str(info.value)


def test_silent_listener_is_not_taken_for_a_server() -> None:
    """A port that accepts connections but never answers HTTP must not hang the sweep."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepted: list[socket.socket] = []
    thread = threading.Thread(target=lambda: accepted.append(listener.accept()[0]), daemon=True)
    thread.start()
    uri = f"http://127.0.0.1:{listener.getsockname()[1]}"
    start = time.monotonic()
    try:
        with pytest.raises(TrackingError, match="is it an MLflow server"):
            check_tracking_uri(uri, timeout=1.5)
        assert time.monotonic() - start < 6
    finally:
        for conn in accepted:
            conn.close()
        listener.close()


def test_file_store_is_refused() -> None:
    with pytest.raises(TrackingError, match="sqlite"):
        check_tracking_uri("file:///tmp/mlruns")


def test_one_run_per_trial_across_failure_retry_and_resume(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/t.db"
    parent = SweepRun.start(uri, "exp", "sweep-a", params={"search": "grid"}, tags={"git_commit": "abc"})
    args = (uri, parent.experiment_id, parent.run_id, "key1", "trial one", {"n_ctx": 4, "ctx_init": ""},
            {"node_ip": "127.0.0.9"})

    run, finished = TrialRun.open(*args)
    assert run is not None and finished is None
    run.log_metrics({"loss": 2.0, "val_acc": None}, step=1, flush=True)
    run.close("FAILED", "NonFiniteLossError: loss became nan")
    client = MlflowClient(uri)
    failed = client.get_run(run.run_id)
    assert failed.info.status == "FAILED" and "NonFiniteLossError" in failed.data.tags[REASON_TAG]
    assert "val_acc" not in failed.data.metrics  # None values are not logged

    retry, finished = TrialRun.open(*args)  # Ray's retry, or a resumed sweep
    assert retry is not None and finished is None and retry.run_id == run.run_id
    again = client.get_run(run.run_id)
    assert again.info.status == "RUNNING" and again.data.tags[ATTEMPT_TAG] == "2"
    assert REASON_TAG not in again.data.tags
    retry.log_metrics({"test_acc": 50.0}, step=2)
    retry.close("FINISHED")

    skipped, finished = TrialRun.open(*args)
    assert skipped is None and finished is not None and finished.info.run_id == run.run_id
    assert finished.data.metrics["test_acc"] == 50.0
    children = parent.children()
    assert [c.info.run_id for c in children] == [run.run_id]
    assert children[0].data.tags[PARENT_TAG] == parent.run_id and children[0].data.params["n_ctx"] == "4"


def test_settle_closes_orphans_and_records_failures_without_runs(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/t.db"
    parent = SweepRun.start(uri, "exp", "sweep-b", params={}, tags={})
    stopped, _ = TrialRun.open(uri, parent.experiment_id, parent.run_id, "k-stopped", "s", {}, {})
    assert stopped is not None  # left RUNNING, as when ASHA or a crash ends the worker
    parent.settle({
        "k-stopped": TrialOutcome("STOPPED", "stopped early by ASHA"),
        "k-failed": TrialOutcome("FAILED", "RayActorError: worker died", "f", {"lr": 0.1}, {"dataset": "X"}),
        "k-fine": TrialOutcome("FINISHED"),
    })
    runs = {r.data.tags[KEY_TAG]: r for r in parent.children()}
    assert set(runs) == {"k-stopped", "k-failed"}
    assert runs["k-stopped"].info.status == "KILLED" and "ASHA" in runs["k-stopped"].data.tags[REASON_TAG]
    assert runs["k-failed"].info.status == "FAILED" and runs["k-failed"].data.params["lr"] == "0.1"
    parent.finish("FINISHED", {"trials_total": 2.0})
    assert MlflowClient(uri).get_run(parent.run_id).info.status == "FINISHED"


def test_trial_on_a_node_without_the_sqlite_file_fails_clearly(tmp_path: Path) -> None:
    missing = f"sqlite:///{tmp_path}/elsewhere/mlflow.db"
    with pytest.raises(TrackingError, match="MLflow server"):
        TrialRun.open(missing, "1", "parent", "key", "name", {}, {})
    assert not (tmp_path / "elsewhere").exists()

