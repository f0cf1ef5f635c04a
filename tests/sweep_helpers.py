"""Shared setup for the sweep tests: a demo workspace with real splits and feature caches, params files,
free loopback ports, and servers (MLflow, Ray nodes) started and stopped by PID / process group."""

from __future__ import annotations

import contextlib
import copy
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # the DVC stage modules (stages/) live in the checkout, not the package
PYTHON = sys.executable
DATASET = "FashionMNIST"
SHOTS = [1, 2]
SEEDS = [1, 2]


@dataclass
class DemoWorkspace:
    """A tmp folder with the demo dataset's split files and feature cache (tiny random-weight CLIP)."""

    root: Path
    base: dict[str, Any]  # params every test starts from

    def params(self, name: str, **sections: dict[str, Any]) -> Path:
        """Write <root>/<name>.yaml: the base params with `sections` merged in (one level deep)."""
        data = copy.deepcopy(self.base)
        for section, values in sections.items():
            data.setdefault(section, {}).update(values)
        path = self.root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path


def base_params(root: Path) -> dict[str, Any]:
    return {
        "data": {"root": str(REPO / "data" / "demo"), "datasets": [DATASET], "shots": SHOTS, "seeds": SEEDS,
                 "splits_dir": str(root / "splits")},
        "backbone": {"arch": "coop-tiny", "pretrained": None},
        "features": {"dir": str(root / "features"), "views": 2, "dtype": "fp16", "seed": 0},
        "train": {"epochs": 2, "eval_every": 1},
        "sweep": {"storage": str(root / "ray"), "results_dir": str(root / "results"), "max_concurrent": 2},
        "tracking": {"uri": f"sqlite:///{root}/mlflow.db", "experiment": "test"},
    }


def build_demo_workspace(root: Path) -> DemoWorkspace:
    """Run the real prepare and features stages on the bundled demo dataset."""
    root.mkdir(parents=True, exist_ok=True)
    workspace = DemoWorkspace(root, base_params(root))
    params = workspace.params("stages")
    for stage in ("stages.prepare", "stages.features"):
        extra = ["--no-progress"] if stage == "stages.features" else []
        done = subprocess.run([PYTHON, "-m", stage, "--params", str(params), *extra], cwd=REPO,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{stage} failed:\n{done.stdout}\n{done.stderr}"
    return workspace


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Any, timeout: float, interval: float = 0.25, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def stop_group(proc: subprocess.Popen, timeout: float = 30) -> None:
    """Stop a process started with start_new_session=True and everything in its process group."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers of the group, if any
    if proc.poll() is None:
        proc.wait(10)
    # A SIGKILLed straggler (e.g. a server's worker, reparented) lingers until the kernel has delivered it: on a
    # loaded machine that is not at once, and callers check that the group is gone.
    deadline = time.monotonic() + 10
    while group_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def group_members(pgid: int) -> list[int]:
    """PIDs whose process group is `pgid` (Linux /proc)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry))
    return members


def pids_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains `text` (e.g. a Ray node's private temp dir)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="ignore")
        except OSError:
            continue
        if text in cmdline:
            found.append(int(entry))
    return found


@contextlib.contextmanager
def mlflow_server(folder: Path, host: str = "127.0.0.1") -> Iterator[str]:
    """A real `mlflow server` on loopback with a SQLite backend in `folder`; yields its URI."""
    port = free_port(host)
    folder.mkdir(parents=True, exist_ok=True)
    log = (folder / "mlflow-server.log").open("w")
    proc = subprocess.Popen(
        [str(Path(PYTHON).parent / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{folder}/server.db",
         "--artifacts-destination", str(folder / "artifacts"), "--host", host, "--port", str(port),
         "--workers", "1"],
        cwd=folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    uri = f"http://{host}:{port}"
    try:
        wait_for(lambda: http_ok(f"{uri}/health") or proc.poll() is not None, 120, 0.5, "mlflow server")
        assert proc.poll() is None, (folder / "mlflow-server.log").read_text()[-3000:]
        yield uri
    finally:
        stop_group(proc)
        log.close()
        assert not group_members(proc.pid), "mlflow server processes survived"


def run_cli(args: list[str], env: dict[str, str] | None = None, timeout: float = 300,
            cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "pipeline.sweep", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@contextlib.contextmanager
def interrupt_when(ready: Callable[[], bool]) -> Iterator[None]:
    """Within the block, this process gets Ray Tune's graceful stop (SIGUSR1, what Ctrl-C triggers: it saves the
    experiment state and returns) once `ready()` (polled every 0.3 s; an exception counts as not yet, e.g. while
    the tracking database is being created)."""
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.3):
            try:
                if ready():
                    os.kill(os.getpid(), signal.SIGUSR1)
                    return
            except Exception:
                continue

    previous = signal.signal(signal.SIGUSR1, lambda *_: None)  # never let a stray SIGUSR1 kill pytest
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()
        signal.signal(signal.SIGUSR1, previous)
