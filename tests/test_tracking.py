"""MLflow tracking: URI resolution, fast failure on a dead server, one run per trial across retries and
resumes, experiments that open as model training and keep their artifacts beside their database, backbone
labels (real MLflow on SQLite)."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from sweep_helpers import free_port

from pipeline.tracking import (
    ATTEMPT_TAG,
    EXPERIMENT_KIND_TAG,
    KEY_TAG,
    PREVIOUS_ATTEMPT_TAG,
    REASON_TAG,
    SweepRun,
    TrackingError,
    TrialOutcome,
    TrialRun,
    absolute_uri,
    backbone_label,
    check_tracking_uri,
    resolve_tracking_uri,
    runs_page,
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


def test_one_run_per_attempt_linked_across_failure_retry_and_resume(tmp_path: Path) -> None:
    """Each attempt of a trial logs into a run of its own (its curve never repeats steps), linked to the one
    before; a FINISHED attempt ends the trial: it is returned, never trained again."""
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
    assert failed.data.tags[ATTEMPT_TAG] == "1"

    retry, finished = TrialRun.open(*args)  # Ray's retry, or a resumed sweep
    assert retry is not None and finished is None and retry.run_id != run.run_id
    second = client.get_run(retry.run_id)
    assert second.info.status == "RUNNING" and second.data.tags[ATTEMPT_TAG] == "2"
    assert second.data.tags[PREVIOUS_ATTEMPT_TAG] == run.run_id and second.data.params["n_ctx"] == "4"
    assert second.data.tags["node_ip"] == "127.0.0.9" and second.info.run_name == "trial one (attempt 2)"
    assert client.get_run(run.run_id).info.status == "FAILED"  # the first attempt keeps its verdict and curve
    retry.log_metrics({"loss": 1.0}, step=1)
    retry.log_metrics({"test_acc": 50.0}, step=2)
    retry.close("FINISHED")
    assert [m.step for m in client.get_metric_history(retry.run_id, "loss")] == [1]

    skipped, finished = TrialRun.open(*args)
    assert skipped is None and finished is not None and finished.info.run_id == retry.run_id
    assert finished.data.metrics["test_acc"] == 50.0
    children = parent.children()
    assert sorted(c.info.run_id for c in children) == sorted([run.run_id, retry.run_id])
    assert parent.trial_runs()["key1"].info.run_id == retry.run_id


def test_an_attempt_left_running_is_closed_when_the_next_one_starts(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/t.db"
    parent = SweepRun.start(uri, "exp", "sweep-c", params={}, tags={})
    args = (uri, parent.experiment_id, parent.run_id, "k", "t", {}, {})
    lost, _ = TrialRun.open(*args)  # its worker dies without closing it
    assert lost is not None
    nxt, _ = TrialRun.open(*args)
    assert nxt is not None
    first = MlflowClient(uri).get_run(lost.run_id)
    assert first.info.status == "FAILED" and nxt.run_id in first.data.tags[REASON_TAG]
    assert parent.close_orphans("driver died") == 1  # the new attempt, still RUNNING here
    assert MlflowClient(uri).get_run(nxt.run_id).data.tags[REASON_TAG] == "driver died"


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



def test_experiments_open_as_model_training(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/t.db"
    client = MlflowClient(uri)
    created = SweepRun.start(uri, "new", "s", params={}, tags={})
    # MLflow 3's kind of experiment; without one its UI first shows the experiment as a GenAI app (traces).
    assert client.get_experiment(created.experiment_id).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    older = client.create_experiment("older", artifact_location=(tmp_path / "mlruns" / "older").as_uri())
    SweepRun.start(uri, "older", "s", params={}, tags={})  # an experiment made before the tag existed gets it
    assert client.get_experiment(older).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    chosen = client.create_experiment("chosen", tags={EXPERIMENT_KIND_TAG: "finetuning"})
    SweepRun.start(uri, "chosen", "s", params={}, tags={})
    assert client.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "finetuning"  # the user's kind stays


def test_runs_page_opens_the_model_training_view() -> None:
    assert runs_page("sqlite:////p/mlflow.db", "3") == (
        "http://127.0.0.1:5000/#/experiments/3/runs?workflowType=machine_learning")
    assert runs_page("http://mlflow.lab:8080/", "7") == (
        "http://mlflow.lab:8080/#/experiments/7/runs?workflowType=machine_learning")


def _log_one_artifact(uri: str, parent: SweepRun, folder: Path) -> str:
    run, _ = TrialRun.open(uri, parent.experiment_id, parent.run_id, "key", "trial", {}, {})
    assert run is not None
    folder.mkdir()
    (folder / "ctx.json").write_text("{}")
    run.log_artifacts(folder)
    run.close("FINISHED")
    return run.run_id


def test_a_copied_or_moved_project_never_writes_into_the_original_folder(tmp_path: Path) -> None:
    original = tmp_path / "project"
    original.mkdir()
    uri = f"sqlite:///{original}/mlflow.db"
    parent = SweepRun.start(uri, "coop demo", "first", params={}, tags={})
    run_id = _log_one_artifact(uri, parent, tmp_path / "a")
    assert (original / "mlruns" / "coop_demo" / run_id / "artifacts" / "ctx.json").is_file()
    SweepRun.start(uri, "coop demo", "second", params={}, tags={})  # the same project again: fine

    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    copy_uri = f"sqlite:///{copy}/mlflow.db"
    with pytest.raises(TrackingError) as info:
        SweepRun.start(copy_uri, "coop demo", "third", params={}, tags={})
    message = str(info.value)
    assert str(original / "mlruns" / "coop_demo") in message and str(copy / "mlruns" / "coop_demo") in message
    assert "tracking.experiment" in message and f"{copy}/mlflow.db" in message
    assert len(MlflowClient(copy_uri).search_runs([parent.experiment_id])) == 3  # no run was started
    # What the message offers: a new experiment in the copy keeps its artifacts in the copy.
    fresh = SweepRun.start(copy_uri, "coop demo 2", "third", params={}, tags={})
    fresh_id = _log_one_artifact(copy_uri, fresh, tmp_path / "b")
    assert (copy / "mlruns" / "coop_demo_2" / fresh_id / "artifacts" / "ctx.json").is_file()
    assert sorted(p.name for p in (original / "mlruns").iterdir()) == ["coop_demo"]

    moved = tmp_path / "moved"
    shutil.move(original, moved)
    with pytest.raises(TrackingError, match="copied or moved from"):
        SweepRun.start(f"sqlite:///{moved}/mlflow.db", "coop demo", "fourth", params={}, tags={})


def test_an_artifact_location_chosen_by_hand_is_kept(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/project/mlflow.db"
    (tmp_path / "project").mkdir()
    chosen = tmp_path / "big-disk" / "artifacts"
    MlflowClient(uri).create_experiment("exp", artifact_location=chosen.as_uri())
    parent = SweepRun.start(uri, "exp", "s", params={}, tags={})
    run_id = _log_one_artifact(uri, parent, tmp_path / "a")
    assert (chosen / run_id / "artifacts" / "ctx.json").is_file()


def test_backbone_label_spells_a_checkpoint_by_its_file_name() -> None:
    # The sweep's parent run sees params' relative path, its trials the absolute one (worker_weights).
    relative = backbone_label("coop-tiny-rn", "models/coop-tiny-world.safetensors")
    absolute = backbone_label("coop-tiny-rn", "/work/x/models/coop-tiny-world.safetensors")
    assert relative == absolute == "coop-tiny-rn/coop-tiny-world.safetensors"
    assert backbone_label("RN50", "openai") == "RN50/openai"
    assert backbone_label("ViT-B-32", "laion2b_s34b_b79k") == "ViT-B-32/laion2b_s34b_b79k"
    assert backbone_label("coop-tiny", None) == "coop-tiny/random"
