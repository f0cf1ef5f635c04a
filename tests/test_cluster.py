"""docs/cluster.md for real, on one machine: a Ray head and a worker raylet on distinct loopback addresses
(token auth on both), an `mlflow server` on loopback, and the sweep CLI driving trials onto both nodes.
Every process is started here and stopped by process group at the end."""

from __future__ import annotations

import contextlib
import csv
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow import MlflowClient
from sweep_helpers import (
    PYTHON,
    DemoWorkspace,
    free_port,
    group_members,
    mlflow_server,
    pids_mentioning,
    run_cli,
    stop_group,
    wait_for,
)

from pipeline.engine.context import load_context
from pipeline.sweep.cluster import check_ray_address
from pipeline.sweep.plan import SweepError
from pipeline.tracking import KEY_TAG, NODE_TAG, PARENT_TAG

pytestmark = pytest.mark.slow  # real Ray nodes and an MLflow server

HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"
RAY = str(Path(PYTHON).parent / "ray")


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _alive_nodes(address: str, env: dict[str, str]) -> int:
    status = subprocess.run([RAY, "status", f"--address={address}"], env=env, capture_output=True, text=True,
                            timeout=60)
    active = status.stdout.split("Active:", 1)[-1].split("Pending:", 1)[0]
    return sum(" node_" in line for line in active.splitlines())


@dataclass
class Cluster:
    address: str
    env: dict[str, str]
    worker_tmp: str  # the worker node's Ray temp dir: its processes' command lines name it


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with two_node_cluster() as running:
        yield running


@contextlib.contextmanager
def two_node_cluster(**ray_env: str) -> Iterator[Cluster]:
    """A Ray head (127.0.0.2) and a worker raylet (127.0.0.3), one CPU each, token auth; `ray_env` adds Ray
    settings (RAY_...) to every process. Stopped by process group at the end, leaving no Ray process behind."""
    # Short private temp dirs: Ray's socket paths must fit in 107 bytes, and they identify our processes.
    head_tmp = tempfile.mkdtemp(prefix="rh-", dir="/tmp")
    worker_tmp = tempfile.mkdtemp(prefix="rw-", dir="/tmp")
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16), **ray_env}
    env.pop("RAY_ADDRESS", None)
    port = free_port(HEAD_IP)
    common = ["--block", "--num-cpus=1", "--disable-usage-stats"]
    logs = [open(Path(head_tmp) / "start.log", "w"), open(Path(worker_tmp) / "start.log", "w")]  # noqa: SIM115
    head = subprocess.Popen(
        [RAY, "start", "--head", f"--node-ip-address={HEAD_IP}", f"--port={port}", "--include-dashboard=false",
         f"--temp-dir={head_tmp}", *common],
        env=env, stdout=logs[0], stderr=subprocess.STDOUT, start_new_session=True,
    )
    procs = [head]
    try:
        wait_for(lambda: _listening(HEAD_IP, port) or head.poll() is not None, 120, 0.5, "the Ray head")
        assert head.poll() is None, (Path(head_tmp) / "start.log").read_text()[-3000:]
        manager_port = free_port(WORKER_IP)
        worker = subprocess.Popen(
            [RAY, "start", f"--address={HEAD_IP}:{port}", f"--node-ip-address={WORKER_IP}",
             f"--node-manager-port={manager_port}", f"--temp-dir={worker_tmp}", *common],
            env=env, stdout=logs[1], stderr=subprocess.STDOUT, start_new_session=True,
        )
        procs.insert(0, worker)
        wait_for(lambda: _listening(WORKER_IP, manager_port) or worker.poll() is not None, 120, 0.5,
                 "the worker raylet")
        assert worker.poll() is None, (Path(worker_tmp) / "start.log").read_text()[-3000:]
        address = f"{HEAD_IP}:{port}"
        # The sweep must see both nodes from its start, or the head's warm worker takes every trial.
        wait_for(lambda: _alive_nodes(address, env) == 2, 120, 1.0, "both Ray nodes to register")
        yield Cluster(address, env, worker_tmp)
    finally:
        for proc in procs:  # worker first, so it does not try to drain from a dead head
            stop_group(proc, timeout=10)  # an idle raylet drains in about a second; do not wait out 30s
        for f in logs:
            f.close()
        leftovers = [pid for proc in procs for pid in group_members(proc.pid)]
        leftovers += pids_mentioning(head_tmp) + pids_mentioning(worker_tmp)
        shutil.rmtree(head_tmp, ignore_errors=True)
        shutil.rmtree(worker_tmp, ignore_errors=True)
        assert not leftovers, f"Ray processes survived: {leftovers}"


def test_sweep_spreads_over_two_nodes_and_logs_to_an_mlflow_server(
    demo_ws: DemoWorkspace, cluster: Cluster, tmp_path: Path
) -> None:
    root = tmp_path / "sweep"
    params = demo_ws.params(
        "cluster",
        data={"shots": [1], "seeds": [1, 2]},
        # Each node has one CPU and a trial takes one. Trials long enough (1500 one-step epochs, ~10 s) that
        # two always run at once, which forces one onto each node; short ones ran one after another and
        # all landed on whichever node's worker process was warm.
        train={"epochs": 1500, "eval_every": 500},
        sweep={"space": {"n_ctx": [4, 8]}, "max_concurrent": 2,
               "storage": str(root / "ray"), "results_dir": str(root / "results")},
        tracking={"experiment": "cluster"},
    )
    with mlflow_server(tmp_path / "mlflow") as uri:
        done = run_cli(["--params", str(params), "--address", cluster.address, "--tracking-uri", uri, "--quiet"],
                       env=cluster.env, timeout=400, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-5000:]

        with (root / "results" / "trials.csv").open() as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 4 and {r["state"] for r in rows} == {"FINISHED"}
        assert {r["node_ip"] for r in rows} == {HEAD_IP, WORKER_IP}

        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name("cluster")
        runs = client.search_runs([experiment.experiment_id])
        parents = [r for r in runs if PARENT_TAG not in r.data.tags]
        children = [r for r in runs if PARENT_TAG in r.data.tags]
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        assert len(children) == 4 and {c.info.status for c in children} == {"FINISHED"}
        assert {c.data.tags[KEY_TAG] for c in children} == {r["trial_key"] for r in rows}
        assert {c.data.tags[NODE_TAG] for c in children} == {HEAD_IP, WORKER_IP}

        # Artifacts went through the server (a worker node has no path to the driver's disk).
        remote = next(c for c in children if c.data.tags[NODE_TAG] == WORKER_IP)
        names = {a.path for a in client.list_artifacts(remote.info.run_id)}
        assert {"ctx.safetensors", "ctx.json", "nearest_words.json", "nearest_words.txt", "config.json"} <= names
        local = Path(client.download_artifacts(remote.info.run_id, "", str(tmp_path / "dl")))
        ctx, meta = load_context(local / "ctx.safetensors")
        assert ctx.shape[-2] == int(remote.data.params["n_ctx"]) and meta.dataset == "FashionMNIST"
        assert any((tmp_path / "mlflow" / "artifacts").rglob("ctx.safetensors"))
        # The driver gathered every context, from both nodes, through the server.
        contexts = root / "results" / "contexts"
        assert sorted(p.name for p in contexts.iterdir()) == sorted(r["trial_key"] for r in rows)
        assert all((contexts / r["trial_key"] / "ctx.safetensors").is_file() for r in rows)
        assert not (tmp_path / "mlruns").exists()


def test_driver_with_another_auth_token_is_refused_quickly(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", cluster.env["RAY_AUTH_TOKEN"])
    check_ray_address(cluster.address)  # the head's token passes (the probe inherits this environment)
    monkeypatch.setenv("RAY_AUTH_TOKEN", secrets.token_hex(16))
    with pytest.raises(SweepError, match="RAY_AUTH_TOKEN"):
        check_ray_address(cluster.address)



def test_a_lost_worker_node_costs_only_its_trials_in_flight(demo_ws: DemoWorkspace, tmp_path: Path) -> None:
    """Kill the worker node's raylet (SIGKILL, by PID) while a trial trains there: Ray retries that trial on the
    head (sweep.retries), its lost attempt's MLflow run ends FAILED with the reason and links to the retry's
    run, every planned trial is in the tables exactly once, FINISHED, and no run is left RUNNING."""
    root = tmp_path / "lost"
    params = demo_ws.params(
        "lost-node",
        data={"shots": [1], "seeds": [1]},
        train={"epochs": 1500, "eval_every": 500},  # ~10 s a trial: both nodes busy at once (see above)
        sweep={"space": {"n_ctx": [4, 8]}, "max_concurrent": 2, "retries": 2,
               "storage": str(root / "ray"), "results_dir": str(root / "results")},
        tracking={"experiment": "lost-node"},
    )
    # The head declares a silent node dead after ~3 s instead of Ray's default ~30 s.
    fast_health = {"RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": "1000",
                   "RAY_health_check_failure_threshold": "3"}
    with two_node_cluster(**fast_health) as lost, mlflow_server(tmp_path / "mlflow") as uri:
        client = MlflowClient(uri)

        def running_on_worker() -> bool:
            experiment = client.get_experiment_by_name("lost-node")
            runs = client.search_runs([experiment.experiment_id]) if experiment else []
            return any(r.info.status == "RUNNING" and r.data.tags.get(NODE_TAG) == WORKER_IP for r in runs)

        sweep = subprocess.Popen(
            [PYTHON, "-m", "pipeline.sweep", "--params", str(params), "--address", lost.address, "--tracking-uri",
             uri, "--quiet"], cwd=tmp_path, env=lost.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, start_new_session=True)
        try:
            wait_for(running_on_worker, 240, 0.5, "a trial training on the worker node")
            raylets = [pid for pid in pids_mentioning(lost.worker_tmp)
                       if "raylet" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="ignore").split("\0")[0]]
            assert raylets, "the worker's raylet process"
            for pid in raylets:
                os.kill(pid, signal.SIGKILL)
            output, _ = sweep.communicate(timeout=400)
        finally:
            stop_group(sweep)
        assert sweep.returncode == 0, output[-5000:]

        rows = list(csv.DictReader((root / "results" / "trials.csv").open()))
        assert len(rows) == 2 and {r["state"] for r in rows} == {"FINISHED"}
        assert len({r["trial_key"] for r in rows}) == 2
        experiment = client.get_experiment_by_name("lost-node")
        runs = [r for r in client.search_runs([experiment.experiment_id]) if PARENT_TAG in r.data.tags]
        assert not [r for r in runs if r.info.status == "RUNNING"]
        lost_runs = [r for r in runs if r.info.status != "FINISHED"]
        assert len(lost_runs) == 1 and lost_runs[0].data.tags[NODE_TAG] == WORKER_IP
        assert lost_runs[0].info.status == "FAILED" and lost_runs[0].data.tags["sweep.failure_reason"]
        retry = next(r for r in runs if r.data.tags.get("sweep.previous_attempt") == lost_runs[0].info.run_id)
        assert retry.info.status == "FINISHED" and retry.data.tags[NODE_TAG] == HEAD_IP
        assert retry.info.run_id in {r["mlflow_run_id"] for r in rows}
        assert [m.step for m in client.get_metric_history(retry.info.run_id, "loss")] == list(range(1, 1501))
