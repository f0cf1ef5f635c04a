"""Fractional GPUs per trial, on a Ray instance that declares one GPU: trials share it, Ray checks capacity.

Ray schedules by declared resources, so the packing logic runs here without a real GPU; each trial then
falls back to the CPU (`train.device: auto`) while Ray has handed it GPU 0.
"""

from __future__ import annotations

from typing import Any

import pytest
import ray
from mlflow import MlflowClient
from sweep_helpers import DemoWorkspace

from pipeline.params import load_params
from pipeline.sweep.plan import SweepError
from pipeline.sweep.tuner import SweepOptions, run_sweep
from pipeline.tracking import GPU_TAG

pytestmark = pytest.mark.slow  # real Ray Tune sweeps


@pytest.fixture(scope="module")
def one_gpu_ray() -> Any:
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def test_half_gpu_trials_share_the_one_gpu_in_a_random_search(demo_ws: DemoWorkspace, one_gpu_ray: Any):
    root = demo_ws.root / "half_gpu"
    params = load_params(demo_ws.params(
        "half_gpu",
        data={"shots": [1], "seeds": [1, 2]},
        train={"epochs": 2, "device": "auto"},
        sweep={"search": "random", "space": {"n_ctx": [2, 4, 8], "csc": [False, True]}, "num_samples": 4,
               "gpus_per_trial": 0.5, "storage": str(root / "ray"), "results_dir": str(root / "res")},
        tracking={"uri": f"sqlite:///{root}/mlflow.db", "experiment": "half"},
    ))
    outcome = run_sweep(params, SweepOptions(verbose=0))
    assert outcome.counts["finished"] == 4
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    experiment = client.get_experiment_by_name("half")
    runs = client.search_runs([experiment.experiment_id], "tags.`ray.trial_id` != ''")
    assert len(runs) == 4
    assert {r.data.tags[GPU_TAG] for r in runs} == {"0"}  # every half-GPU trial got the one GPU
    configs = {(r.data.params["n_ctx"], r.data.params["csc"], r.data.params["seed"]) for r in runs}
    assert len(configs) == 4  # random search drew 4 distinct configurations


def test_more_gpu_per_trial_than_the_cluster_has_is_refused(demo_ws: DemoWorkspace, one_gpu_ray: Any):
    root = demo_ws.root / "two_gpus"
    params = load_params(demo_ws.params(
        "two_gpus",
        sweep={"gpus_per_trial": 2, "storage": str(root / "ray"), "results_dir": str(root / "res")},
        tracking={"uri": f"sqlite:///{root}/mlflow.db", "experiment": "two"},
    ))
    with pytest.raises(SweepError, match="asks for 1 CPU and 2 GPU"):
        run_sweep(params, SweepOptions(verbose=0))
