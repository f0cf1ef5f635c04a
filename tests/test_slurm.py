"""cluster/slurm/coop-sweep.sbatch for real on a one-node loopback SLURM: a sweep, and its resume after requeues."""

from __future__ import annotations

import contextlib
import csv
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow import MlflowClient
from sweep_helpers import REPO, DemoWorkspace, free_port, group_members, pids_mentioning, stop_group, wait_for

from pipeline.sweep.resume import read_state
from pipeline.tracking import ATTEMPT_TAG, KEY_TAG, NODE_TAG, PARENT_TAG, REASON_TAG

SLURM_PROGRAMS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo")


def _program(name: str) -> str | None:
    """The SLURM or MUNGE program's path (daemons live in /usr/sbin, which a user's PATH may lack)."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin")


MISSING = [name for name in SLURM_PROGRAMS if _program(name) is None]
pytestmark = [
    pytest.mark.slow,  # a SLURM controller and node daemon, real jobs with Ray and an MLflow server
    pytest.mark.skipif(bool(MISSING), reason=f"SLURM is not installed (no {', '.join(MISSING)}): "
                       "`apt-get install slurm-wlm munge` runs this test"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the test's slurmd runs jobs as root (SlurmUser=root)"),
]

TEMPLATE = REPO / "cluster" / "slurm" / "coop-sweep.sbatch"
# Ray turns a node address of 127.0.0.1 into the machine's network address; any other loopback address stays.
HEAD_IP = "127.0.0.6"
NODE = "coopnode"
DONE_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


@dataclass
class Slurm:
    """A running one-node SLURM: its config folder and the environment its commands need (SLURM_CONF)."""

    root: Path
    env: dict[str, str]

    def run(self, *args: str, timeout: float = 60) -> str:
        done = subprocess.run([_program(args[0]) or args[0], *args[1:]], env=self.env, capture_output=True,
                              text=True, timeout=timeout)
        assert done.returncode == 0, f"{' '.join(args)}: {done.stdout}{done.stderr}"
        return done.stdout

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as key=value pairs (JobState, Restarts, ExitCode, ...)."""
        line = self.run("scontrol", "show", "job", "--oneliner", job_id)
        return dict(re.findall(r"(\w+)=(\S*)", line))


SLURM_CONF = """\
ClusterName=coopsweep
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/sock/munge.sock
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
MailProg=/bin/true
# No cgroups in a container: track a job's processes by parentage, bind no CPUs, gather no accounting.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
KillWait=30
MinJobAge=3600
NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture(scope="module")
def slurm() -> Iterator[Slurm]:
    # munged wants every folder above its socket open to all (pytest's tmp folders are private).
    root = Path(tempfile.mkdtemp(prefix="slurm-", dir="/tmp"))
    root.chmod(0o755)
    for folder, mode in (("sock", 0o755), ("munge", 0o700), ("state", 0o755), ("spool", 0o755), ("log", 0o755)):
        (root / folder).mkdir(mode=mode)
    subprocess.run([_program("mungekey"), "--create", f"--keyfile={root}/munge/munge.key"], check=True)
    host = socket.gethostname().split(".")[0]
    conf = SLURM_CONF.format(host=host, node=NODE, root=root, ctld_port=free_port(), slurmd_port=free_port())
    (root / "slurm.conf").write_text(conf)
    env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}
    for name in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE"):
        env.pop(name, None)  # the template must start from its own settings
    logs = {name: (root / "log" / f"{name}.out").open("w") for name in ("munged", "slurmctld", "slurmd")}
    commands = {
        "munged": [_program("munged"), "--foreground", f"--socket={root}/sock/munge.sock",
                   f"--key-file={root}/munge/munge.key", f"--pid-file={root}/munge/munged.pid",
                   f"--log-file={root}/munge/munged.log", f"--seed-file={root}/munge/munged.seed"],
        "slurmctld": [_program("slurmctld"), "-D", "-i"],
        "slurmd": [_program("slurmd"), "-D", "-N", NODE],
    }
    daemons: list[subprocess.Popen] = []
    try:
        for name, command in commands.items():
            daemons.append(subprocess.Popen(command, env=env, stdout=logs[name], stderr=subprocess.STDOUT,
                                            start_new_session=True))
            if name == "munged":
                wait_for(lambda: (root / "sock" / "munge.sock").exists() or daemons[0].poll() is not None, 30,
                         what="munged's socket")
        cluster = Slurm(root, env)

        def node_idle() -> bool:
            for proc, name in zip(daemons, commands, strict=True):
                assert proc.poll() is None, f"{name} exited: {(root / 'log' / f'{name}.out').read_text()[-3000:]}"
            state = subprocess.run([_program("sinfo"), "--noheader", "--format=%T"], env=env, capture_output=True,
                                   text=True, timeout=30)
            return state.stdout.strip() == "idle"

        wait_for(node_idle, 60, 1.0, "the SLURM node to be idle")
        yield cluster
    finally:
        for proc in reversed(daemons):  # slurmd, slurmctld, then munged
            stop_group(proc, timeout=30)
        for f in logs.values():
            f.close()
        leftovers = [pid for proc in daemons for pid in group_members(proc.pid)] + pids_mentioning(str(root))
        shutil.rmtree(root, ignore_errors=True)
        assert not leftovers, f"SLURM processes survived: {leftovers}"


@dataclass
class Job:
    id: str
    log: Path
    mlflow_dir: Path
    ray_tmp: str
    uri: str  # the job's MLflow server while it runs


def submit(slurm: Slurm, params: Path, folder: Path, **settings: str) -> Job:
    """sbatch the template as a user would, on one node with 2 CPUs and no GPU, its MLflow store and log in
    `folder`, a free port for each server; `settings` adds template variables (SWEEP_NAME=...)."""
    folder.mkdir(parents=True, exist_ok=True)
    mlflow_port = free_port(HEAD_IP)
    ray_tmp = tempfile.mkdtemp(prefix="rs-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    venv = sys.prefix if (Path(sys.prefix) / "bin" / "activate").is_file() else ""
    env = {**slurm.env, "PROJECT_DIR": str(REPO), "VENV": venv, "PARAMS": str(params), "HEAD_IP": HEAD_IP,
           "RAY_PORT": str(free_port(HEAD_IP)), "RAY_TMP": ray_tmp, "MLFLOW_DIR": str(folder / "mlflow-server"),
           "MLFLOW_PORT": str(mlflow_port), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           **settings}
    done = subprocess.run(
        [_program("sbatch"), "--parsable", "--nodes=1", "--cpus-per-task=2", "--gpus-per-node=0",
         f"--output={folder}/job-%j.out", str(TEMPLATE)],
        env=env, capture_output=True, text=True, timeout=60, cwd=folder,
    )
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.strip().split(";")[0]
    return Job(job_id, folder / f"job-{job_id}.out", folder / "mlflow-server", ray_tmp,
               f"http://{HEAD_IP}:{mlflow_port}")


def wait_job(slurm: Slurm, job: Job, timeout: float, restarts: int = 0) -> dict[str, str]:
    """Wait until the job's run number `restarts` has ended; its `scontrol show job` fields."""
    info: dict[str, str] = {}

    def ended() -> bool:
        nonlocal info
        info = slurm.job(job.id)
        return int(info.get("Restarts", 0)) >= restarts and info.get("JobState") in DONE_STATES

    try:
        wait_for(ended, timeout, 2.0, f"job {job.id} to end")
    except TimeoutError:
        raise AssertionError(f"job {job.id} still {info.get('JobState')}:\n{read_log(job)[-5000:]}") from None
    return info


def release_requeued(slurm: Slurm, job: Job, restarts: int) -> None:
    """A requeued job waits two minutes (SLURM's requeue hold) before it may start again: start it now."""
    def requeued() -> bool:
        info = slurm.job(job.id)
        return int(info.get("Restarts", 0)) >= restarts and info.get("JobState") == "PENDING"

    wait_for(requeued, 180, 1.0, f"job {job.id} to be requeued")
    slurm.run("scontrol", "update", f"JobId={job.id}", "StartTime=now")


def read_log(job: Job) -> str:
    return job.log.read_text(errors="replace") if job.log.is_file() else ""


def children(client: MlflowClient, experiment: str) -> list:
    found = client.get_experiment_by_name(experiment)
    return [r for r in client.search_runs([found.experiment_id]) if PARENT_TAG in r.data.tags] if found else []


def live_children(job: Job, experiment: str) -> list:
    """The trial runs as the job's MLflow server has them now ([] while it is down)."""
    with contextlib.suppress(Exception):  # the server is starting or stopping
        return children(MlflowClient(job.uri), experiment)
    return []


def assert_nothing_left(job: Job, params: Path) -> None:
    """No Ray process (they name the job's Ray folder), no MLflow server (it names its store) and no sweep driver
    (it names the params file) outlives the job."""
    def leftovers() -> list[int]:
        return pids_mentioning(job.ray_tmp) + pids_mentioning(str(job.mlflow_dir)) + pids_mentioning(str(params))

    with contextlib.suppress(TimeoutError):  # a cancelled job's processes get SIGKILL after KillWait (30 s)
        wait_for(lambda: not leftovers(), 60, 1.0)
    assert not leftovers(), [Path(f"/proc/{pid}/cmdline").read_bytes()[:200] for pid in leftovers()]
    shutil.rmtree(job.ray_tmp, ignore_errors=True)


@pytest.fixture(autouse=True)
def _mlflow_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    # The test polls a server that comes and goes with the job: one quick try per poll, no retries.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")


def test_sbatch_template_runs_a_sweep_and_stops_everything(slurm: Slurm, demo_ws: DemoWorkspace,
                                                          tmp_path: Path) -> None:
    root = tmp_path / "sweep"
    params = demo_ws.params(
        "slurm-once",
        data={"shots": [1], "seeds": [1, 2]},
        sweep={"storage": str(root / "ray"), "results_dir": str(root / "results"), "max_concurrent": 2},
        tracking={"experiment": "slurm"},
    )
    job = submit(slurm, params, tmp_path / "job")
    info = wait_job(slurm, job, 600)
    log = read_log(job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-5000:]
    for line in ("Ray cluster up at", "MLflow server up at", f"starting sweep coop-{job.id}",
                 "sweep exited with status 0", "Ray stopped on 1 node(s)", "MLflow server (pid"):
        assert line in log, f"{line!r} not in the job's log:\n{log[-5000:]}"

    rows = list(csv.DictReader((root / "results" / "trials.csv").open()))
    assert len(rows) == 2 and {r["state"] for r in rows} == {"FINISHED"}
    assert {r["node_ip"] for r in rows} == {HEAD_IP}  # trials ran on the job's Ray node
    client = MlflowClient(f"sqlite:///{job.mlflow_dir}/mlflow.db")  # the server's own store; it is stopped
    runs = children(client, "slurm")
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    assert {r.info.run_id for r in runs} == {r["mlflow_run_id"] for r in rows}
    parent = client.get_run(runs[0].data.tags[PARENT_TAG])
    assert parent.info.run_name == f"coop-{job.id}" and parent.info.status == "FINISHED"
    assert len(list((job.mlflow_dir / "artifacts").rglob("ctx.safetensors"))) == 2  # uploaded through the server
    assert_nothing_left(job, params)


def test_a_requeued_job_resumes_its_sweep(slurm: Slurm, demo_ws: DemoWorkspace, tmp_path: Path) -> None:
    """One job, three runs: SIGUSR1 to its batch shell (what `#SBATCH --signal=B:USR1@300` sends before the time
    limit) makes it stop the sweep gracefully and requeue itself; then `scontrol requeue` (an admin, preemption)
    stops everything at once. Each run resumes the same sweep: finished trials keep their single run, each
    interrupted trial is closed KILLED and trained again in a new run, and the last run finishes the sweep."""
    root = tmp_path / "sweep"
    params = demo_ws.params(
        "slurm-requeue",
        data={"shots": [1], "seeds": [1, 2]},
        train={"epochs": 3000, "eval_every": 1000},  # ~10 s a trial: long enough to interrupt one
        sweep={"space": {"n_ctx": [4, 8]}, "max_concurrent": 1,
               "storage": str(root / "ray"), "results_dir": str(root / "results")},
        tracking={"experiment": "requeue"},
    )
    job = submit(slurm, params, tmp_path / "job")
    finished_before: dict[str, str] = {}  # trial key -> its FINISHED run, seen before a requeue

    def one_done_one_training() -> bool:
        runs = live_children(job, "requeue")
        done = {r.data.tags[KEY_TAG]: r.info.run_id for r in runs if r.info.status == "FINISHED"}
        if done.keys() - finished_before.keys() and any(r.info.status == "RUNNING" for r in runs):
            finished_before.update(done)
            return True
        return False

    # Run 1: near the time limit SLURM signals the batch shell alone.
    wait_for(one_done_one_training, 400, 1.0, "a finished trial and one training (run 1)")
    slurm.run("scancel", "--batch", "--signal=USR1", job.id)
    release_requeued(slurm, job, restarts=1)
    after_first = len(finished_before)
    # Run 2: `scontrol requeue` signals every process of the job at once, Ray and MLflow included.
    wait_for(one_done_one_training, 400, 1.0, "a finished trial and one training (run 2)")
    assert len(finished_before) > after_first
    slurm.run("scontrol", "requeue", job.id)
    release_requeued(slurm, job, restarts=2)
    info = wait_job(slurm, job, 600, restarts=2)
    log = read_log(job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-5000:]

    name = f"coop-{job.id}"
    ordered = [f"starting sweep {name}", "received SIGUSR1", "sweep exited with status 130",  # a graceful stop
               f"requeueing job {job.id}", "restart 1", f"resuming sweep {name}", "received SIGTERM", "restart 2",
               f"resuming sweep {name}", "sweep exited with status 0", "MLflow server (pid"]
    position = 0
    for line in ordered:
        found = log.find(line, position)
        assert found >= 0, f"{line!r} not in the job's log after position {position}:\n{log[-8000:]}"
        position = found + len(line)

    rows = list(csv.DictReader((root / "results" / "trials.csv").open()))
    assert len(rows) == 4 and len({r["trial_key"] for r in rows}) == 4
    assert {r["state"] for r in rows} == {"FINISHED"}
    client = MlflowClient(f"sqlite:///{job.mlflow_dir}/mlflow.db")
    runs = children(client, "requeue")
    assert not [r for r in runs if r.info.status == "RUNNING"]
    by_key: dict[str, list] = {}
    for run in runs:
        by_key.setdefault(run.data.tags[KEY_TAG], []).append(run)
    by_run = {r["trial_key"]: r["mlflow_run_id"] for r in rows}
    for key, run_id in finished_before.items():  # finished before a requeue: never trained again
        assert [r.info.run_id for r in by_key[key] if r.info.status == "FINISHED"] == [run_id], key
        assert by_run[key] == run_id
    interrupted = [r for r in runs if r.info.status != "FINISHED"]
    assert len(interrupted) >= 2 and {r.info.status for r in interrupted} == {"KILLED"}
    assert all(r.data.tags.get(REASON_TAG) for r in interrupted)
    for row in rows:  # the run trials.csv names holds one attempt's whole curve, no repeats
        final = client.get_run(row["mlflow_run_id"])
        assert final.info.status == "FINISHED" and final.data.tags[NODE_TAG] == HEAD_IP
        history = [m.step for m in client.get_metric_history(final.info.run_id, "loss")]
        assert history == list(range(1, 3001)), (row["trial_key"], len(history))
        assert int(final.data.tags.get(ATTEMPT_TAG, "1")) == len(by_key[row["trial_key"]])
    parent = client.get_run(runs[0].data.tags[PARENT_TAG])
    assert parent.info.run_name == name and parent.info.status == "FINISHED"
    assert_nothing_left(job, params)


def test_a_new_job_resumes_a_cancelled_jobs_sweep(slurm: Slurm, demo_ws: DemoWorkspace, tmp_path: Path) -> None:
    """`scancel` a job mid-sweep; a new job with SWEEP_NAME=coop-<that job> resumes it, its own MLflow server on
    another port over the same store (the sweep's state is pointed at it), and finishes it; a third job with that
    name finds the sweep finished and starts nothing."""
    root = tmp_path / "sweep"
    params = demo_ws.params(
        "slurm-resubmit",
        data={"shots": [1], "seeds": [1, 2]},
        train={"epochs": 3000, "eval_every": 1000},
        sweep={"max_concurrent": 1, "storage": str(root / "ray"), "results_dir": str(root / "results")},
        tracking={"experiment": "resubmit"},
    )
    first = submit(slurm, params, tmp_path / "job")
    wait_for(lambda: any(r.info.status == "RUNNING" for r in live_children(first, "resubmit")), 400, 1.0,
             "a trial training")
    slurm.run("scancel", first.id)
    assert wait_job(slurm, first, 180)["JobState"] == "CANCELLED"
    assert_nothing_left(first, params)
    name = f"coop-{first.id}"
    assert not read_state(root / "ray", name).finished

    second = submit(slurm, params, tmp_path / "job", SWEEP_NAME=name)
    assert second.uri != first.uri
    info = wait_job(slurm, second, 600)
    log = read_log(second)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-5000:]
    assert f"the MLflow server moved from {first.uri} to {second.uri}" in log, log[-5000:]
    assert f"resuming sweep {name}" in log and "sweep exited with status 0" in log
    state = read_state(root / "ray", name)
    assert state.finished and state.tracking_uri == second.uri
    rows = list(csv.DictReader((root / "results" / "trials.csv").open()))
    assert len(rows) == 2 and {r["state"] for r in rows} == {"FINISHED"}
    runs = children(MlflowClient(f"sqlite:///{second.mlflow_dir}/mlflow.db"), "resubmit")
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED", "KILLED"]  # one trial trained twice
    assert_nothing_left(second, params)

    third = submit(slurm, params, tmp_path / "job", SWEEP_NAME=name)
    info = wait_job(slurm, third, 120)
    log = read_log(third)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-5000:]
    assert f"sweep {name} already finished; nothing to do" in log
    assert "MLflow server starting" not in log and "Ray cluster up" not in log
    assert len(children(MlflowClient(f"sqlite:///{second.mlflow_dir}/mlflow.db"), "resubmit")) == 3
    assert_nothing_left(third, params)
