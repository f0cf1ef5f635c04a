"""The sweep's MLflow parent run: the params it logs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.params import params_from_dict
from pipeline.sweep.plan import plan_sweep
from pipeline.sweep.tuner import parent_run_params
from pipeline.tracking import backbone_label


def test_parent_run_logs_the_search_and_names_the_backbone_as_every_other_run() -> None:
    raw = {"data": {"datasets": ["FashionMNIST"], "shots": [1], "seeds": [1, 2]},
           "sweep": {"space": {"n_ctx": [4, 8]}, "cpus_per_trial": 2}}
    params = params_from_dict(raw)  # backbone coop-tiny, pretrained: null (random weights)
    logged = parent_run_params(params, plan_sweep(params))
    assert logged["backbone"] == "coop-tiny/random"  # as trials' tags, baselines and domain shift say it
    assert (logged["search"], logged["num_samples"], logged["cpus_per_trial"]) == ("grid", 4, 2)
    assert json.loads(logged["space"])["n_ctx"] == [4, 8]
    pretrained = params_from_dict({**raw, "backbone": {"arch": "RN50", "pretrained": "openai"}})
    assert parent_run_params(pretrained, plan_sweep(pretrained))["backbone"] == "RN50/openai"


def test_parent_run_and_trials_name_a_checkpoint_alike(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.engine.backbone import worker_weights

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "world.safetensors").write_bytes(b"")
    raw = {"data": {"datasets": ["FashionMNIST"], "shots": [1], "seeds": [1]},
           "backbone": {"arch": "coop-tiny-rn", "pretrained": "models/world.safetensors"}}
    params = params_from_dict(raw)
    trials_weights = worker_weights(params.backbone.pretrained)  # what the trials get: the absolute path
    assert trials_weights == str(tmp_path / "models" / "world.safetensors")
    assert parent_run_params(params, plan_sweep(params))["backbone"] == "coop-tiny-rn/world.safetensors"
    assert backbone_label("coop-tiny-rn", trials_weights) == "coop-tiny-rn/world.safetensors"
