"""The sweep's Ray cluster: which address, a probe that fails in seconds, ray.init (loopback when local), resources."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from typing import Any
from urllib.parse import urlparse

from pipeline.params import Params
from pipeline.sweep.plan import SweepError

log = logging.getLogger(__name__)

_GCS_PROBE = (
    "import sys\n"
    "from ray._raylet import GcsClient\n"
    "GcsClient(address=sys.argv[1]).internal_kv_get(b'coop-sweep-probe', None)\n"
)


def resolve_address(params: Params) -> str | None:
    """sweep.address (or --address), else RAY_ADDRESS; None: start a local Ray instance."""
    address = params.sweep.address or os.environ.get("RAY_ADDRESS") or None
    return None if address in (None, "", "local") else address


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


def init_ray(address: str | None) -> bool:
    """Connect to (or start) Ray; True when this call started it and should shut it down."""
    import ray

    if ray.is_initialized():
        if address:
            log.info("Ray is already initialised in this process; using it rather than %s", address)
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
    # ray.init installs its own SIGTERM handler (an immediate exit); the sweep command's (stop like Ctrl-C:
    # Ray Tune saves its state, exit 130) must stay in force, so it is put back afterwards.
    on_sigterm = signal.getsignal(signal.SIGTERM)
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
    if on_sigterm is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_sigterm)
    return True


def online_workers(params: Params) -> int:
    """Image-decoding processes of an online trial: features.online_workers, else all its CPUs but one.

    The trial's own process trains; the others (sweep.cpus_per_trial - 1 of them) decode and crop images.
    """
    workers = params.features.online_workers
    return workers if workers is not None else max(0, int(params.sweep.cpus_per_trial) - 1)


def check_resources(params: Params) -> None:
    """A trial must fit the cluster's CPUs and GPUs, or Tune would wait for it forever."""
    import ray

    available = ray.cluster_resources()
    cpus, gpus = params.sweep.cpus_per_trial, params.sweep.gpus_per_trial
    if available.get("CPU", 0) < cpus or available.get("GPU", 0) < gpus:
        raise SweepError(
            f"a trial asks for {cpus:g} CPU and {gpus:g} GPU (sweep.cpus_per_trial / gpus_per_trial) but the "
            f"Ray cluster has {available.get('CPU', 0):g} CPU and {available.get('GPU', 0):g} GPU in total"
        )
