"""Faults a long sweep must survive, injected for real: the driver killed with SIGKILL mid-sweep (by PID), then
a new sweep in the same storage (which must point at the unfinished one) and --resume (which must finish only
what is left, close the runs the dead driver orphaned and keep each attempt's curves apart)."""

from __future__ import annotations

import contextlib
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from sweep_helpers import REPO, DemoWorkspace, group_members, stop_group, wait_for

from pipeline.tracking import KEY_TAG, PARENT_TAG, PREVIOUS_ATTEMPT_TAG, REASON_TAG

pytestmark = pytest.mark.slow

EPOCHS = 2000


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def children(uri: str, experiment: str) -> list:
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    return [r for r in client.search_runs([found.experiment_id], max_results=1000) if PARENT_TAG in r.data.tags]


def sweep(params: Path, *args: str, log: Path) -> subprocess.Popen:
    """The sweep command as a user runs it, in a process group of its own (its Ray processes included)."""
    return subprocess.Popen([sys.executable, "-m", "stages.sweep", "--params", str(params), "--quiet", *args],
                            cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def test_a_sigkilled_driver_is_detected_resumed_and_its_orphaned_runs_closed(demo_ws: DemoWorkspace) -> None:
    root = demo_ws.root / "sigkill"
    uri = f"sqlite:///{root}/mlflow.db"
    params = demo_ws.params(
        "sigkill",
        data={"shots": [1], "seeds": [1, 2]},
        train={"epochs": EPOCHS, "eval_every": 500},  # ~10-30 s a trial: the kill finds trials training
        sweep={"space": {"n_ctx": [4, 8, 16]}, "max_concurrent": 2, "storage": str(root / "ray"),
               "results_dir": str(root / "results")},
        tracking={"uri": uri, "experiment": "sigkill"},
    )
    n_trials = 3 * 2
    driver = sweep(params, "--name", "killed", log=root.with_suffix(".first.log"))
    try:
        # Kill the driver (SIGKILL: no handler runs) once a trial has finished and others are training.
        def ready() -> bool:
            with contextlib.suppress(Exception):
                runs = children(uri, "sigkill")
                states = [r.info.status for r in runs]
                return "FINISHED" in states and "RUNNING" in states
            return False

        wait_for(ready, timeout=240, interval=0.5, what="a finished and a running trial")
        time.sleep(3)  # let Ray save its experiment state after the first trial ended
        wait_for(lambda: "RUNNING" in [r.info.status for r in children(uri, "sigkill")], timeout=120,
                 interval=0.2, what="a trial training when the driver dies")
        # The driver's machine goes down: the driver and its local Ray processes die at once, so nothing
        # closes the runs of the trials in flight (a SIGTERM would let the workers mark them KILLED).
        os.kill(driver.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(30)
    finally:
        stop_group(driver)  # stragglers of the dead driver's process group, if any
    assert not group_members(driver.pid)
    before = children(uri, "sigkill")
    finished_before = {r.data.tags[KEY_TAG]: r for r in before if r.info.status == "FINISHED"}
    orphaned = [r.info.run_id for r in before if r.info.status == "RUNNING"]
    assert finished_before and orphaned, "the kill should leave finished and running trials"

    # A new sweep in the same storage says how to finish the unfinished one (here: a --dry-run start is not
    # enough, the check runs when a sweep starts; a one-trial sweep keeps it short).
    other = demo_ws.params("sigkill-other", data={"shots": [1], "seeds": [1]},
                           train={"epochs": 1, "eval_every": 0},
                           sweep={"storage": str(root / "ray"), "results_dir": str(root / "other")},
                           tracking={"uri": uri, "experiment": "sigkill-other"})
    log = root.with_suffix(".other.log")
    done = sweep(other, "--name", "another", log=log)
    try:
        assert done.wait(300) == 0, log.read_text()
    finally:
        stop_group(done)
    text = log.read_text()
    assert "sweep killed" in text and "did not finish" in text and "--resume killed" in text

    log = root.with_suffix(".resume.log")
    resumed = sweep(params, "--resume", "killed", log=log)
    try:
        assert resumed.wait(600) == 0, log.read_text()
    finally:
        stop_group(resumed)
    assert "closed" in log.read_text() and "orphaned" in log.read_text()

    rows = read_csv(root / "results" / "trials.csv")
    assert len(rows) == n_trials and {r["state"] for r in rows} == {"FINISHED"}
    assert len({r["trial_key"] for r in rows}) == n_trials  # every planned trial exactly once
    after = children(uri, "sigkill")
    assert not [r for r in after if r.info.status == "RUNNING"]  # no run left RUNNING
    client = MlflowClient(uri)
    by_id = {r.info.run_id: r for r in after}
    for run_id in orphaned:  # closed by --resume, with a reason, and continued in a linked run
        run = by_id[run_id]
        assert run.info.status == "KILLED" and "driver" in run.data.tags[REASON_TAG]
        assert any(r.data.tags.get(PREVIOUS_ATTEMPT_TAG) == run_id and r.info.status == "FINISHED" for r in after)
    for key, run in finished_before.items():  # not trained again
        assert by_id[run.info.run_id].info.end_time == run.info.end_time
        assert next(r for r in rows if r["trial_key"] == key)["mlflow_run_id"] == run.info.run_id
    for row in rows:  # each run's curve is one attempt's: epochs 1..EPOCHS once
        steps = [m.step for m in client.get_metric_history(row["mlflow_run_id"], "loss")]
        assert sorted(steps) == list(range(1, EPOCHS + 1))
    state = (root / "ray" / "killed.sweep.json").read_text()
    assert '"finished": true' in state


def test_sigterm_stops_the_sweep_like_ctrl_c(demo_ws: DemoWorkspace) -> None:
    """SIGTERM (what SLURM, Kubernetes and `kill` send) saves Ray Tune's state and exits 130 with the resume
    command, although ray.init installs a handler of its own."""
    root = demo_ws.root / "sigterm"
    uri = f"sqlite:///{root}/mlflow.db"
    params = demo_ws.params(
        "sigterm", data={"shots": [1], "seeds": [1]}, train={"epochs": 3000, "eval_every": 500},
        sweep={"space": {"n_ctx": [4, 8]}, "storage": str(root / "ray"), "results_dir": str(root / "results")},
        tracking={"uri": uri, "experiment": "sigterm"},
    )
    log = root.with_suffix(".log")
    driver = sweep(params, "--name", "termed", log=log)
    try:
        wait_for(lambda: "RUNNING" in [r.info.status for r in children(uri, "sigterm")], timeout=240, interval=0.5,
                 what="a trial training")
        os.kill(driver.pid, signal.SIGTERM)
        assert driver.wait(120) == 130, log.read_text()[-3000:]
    finally:
        stop_group(driver)
    assert "--resume termed" in log.read_text()
    assert not [r for r in children(uri, "sigterm") if r.info.status == "RUNNING"]
