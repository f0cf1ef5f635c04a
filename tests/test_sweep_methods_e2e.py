"""Methods x protocols end to end on the demo world: the world's tasks written by its generator, the real
prepare and features stages with the shipped world CLIP, then one real Ray Tune sweep over CoOp, CoCoOp and
KgCoOp under few-shot, base-to-new and cross-dataset transfer, tracked in real MLflow (SQLite)."""

from __future__ import annotations

import csv
import math
import subprocess
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from mlflow import MlflowClient

from pipeline.data.fewshot import eval_list_path, split_path
from pipeline.data.synthetic.tasks import get_task, write_world
from pipeline.engine.backbone import load_backbone
from pipeline.engine.context import load_learned
from pipeline.engine.inputs import split_base_new
from pipeline.engine.methods import learned_accuracy
from pipeline.features.assemble import load_eval_features, load_fewshot_features
from pipeline.features.cache import FeatureConfig
from pipeline.params import load_params
from pipeline.sweep.inputs import MissingInputsError
from pipeline.sweep.tuner import SweepOptions, run_sweep
from pipeline.tracking import KEY_TAG, PARENT_TAG

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
DATASETS = ["WorldSketch", "WorldPastelRare"]
MODEL = str(REPO / "models" / "coop-tiny-world.safetensors")


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("world_methods")
    write_world(root / "data", [get_task(name) for name in DATASETS])
    raw = {
        "data": {"root": str(root / "data"), "datasets": DATASETS, "shots": [2], "seeds": [1],
                 "splits_dir": str(root / "splits")},
        "backbone": {"arch": "coop-tiny-rn", "pretrained": MODEL},
        "features": {"dir": str(root / "features"), "views": 1},
        "train": {"epochs": 2, "batch_size": 8},
        "sweep": {"storage": str(root / "ray"), "results_dir": str(root / "results"), "max_concurrent": 2,
                  "space": {"method": ["coop", "cocoop", "kgcoop"], "protocol": ["fewshot", "base2new", "xd"],
                            "ctx_init": ["a photo of a"], "batch_size": [4]}},
        "tracking": {"uri": f"sqlite:///{root}/mlflow.db", "experiment": "methods"},
    }
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    for stage in ("stages.prepare", "stages.features"):
        done = subprocess.run([str(Path(__import__("sys").executable)), "-m", stage, "--params", str(path)],
                              cwd=REPO, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{stage} failed:\n{done.stdout}\n{done.stderr}"
    return path, raw


def test_methods_by_protocols_sweep_end_to_end(world: tuple[Path, dict[str, Any]]) -> None:
    path, raw = world
    params = load_params(path)
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        outcome = run_sweep(params, SweepOptions(verbose=0))
    finally:
        ray.shutdown()
    n = 3 * 3 * len(DATASETS)
    assert outcome.counts["finished"] == n and not outcome.interrupted
    results = Path(raw["sweep"]["results_dir"])
    rows = read_csv(results / "trials.csv")
    assert len(rows) == n and {r["state"] for r in rows} == {"FINISHED"}
    assert {(r["method"], r["protocol"]) for r in rows} == {(m, p) for m in ("coop", "cocoop", "kgcoop")
                                                          for p in ("fewshot", "base2new", "xd")}
    for r in rows:
        if r["protocol"] == "base2new":
            base, new = float(r["test_acc"]), float(r["new_acc"])
            assert math.isclose(float(r["h_acc"]), 2 * base * new / (base + new), rel_tol=1e-3)
        else:
            assert r["new_acc"] == r["h_acc"] == ""
    # CoCoOp ran at the batch size the space gave; KgCoOp's weight is its recipe's.
    assert {r["batch_size"] for r in rows} == {"4"}
    assert {r["kg_weight"] for r in rows if r["method"] == "kgcoop"} == {"8.0"}

    # Cross-dataset transfer: one row per xd trial x the other dataset.
    transfer = read_csv(results / "transfer.csv")
    xd = [r for r in rows if r["protocol"] == "xd"]
    assert sorted((t["trial_key"], t["target"]) for t in transfer) == sorted(
        (r["trial_key"], next(d for d in DATASETS if d != r["dataset"])) for r in xd)
    assert all(0 <= float(t["test_acc"]) <= 100 for t in transfer)

    # The saved models reproduce the recorded new-class and transfer accuracies (save_learned -> load_learned).
    backbone = load_backbone("coop-tiny-rn", MODEL)
    config = FeatureConfig.from_params(backbone, params.features)
    client = MlflowClient(params.tracking.uri)
    for r in rows:
        tensors, meta = load_learned(results / "contexts" / r["trial_key"] / "ctx.safetensors")
        assert meta.method == r["method"]
        assert any(name.startswith("meta_net.") for name in tensors) == (r["method"] == "cocoop")
        if r["protocol"] == "base2new":
            data = load_fewshot_features(params.features.dir, split_path(params.data.splits_dir, r["dataset"], 2, 1),
                                         config)
            base_data, new_classes = split_base_new(data)
            assert meta.classnames == base_data.classnames
            assert learned_accuracy(backbone, tensors, meta, new_classes) == pytest.approx(float(r["new_acc"]))
        if r["protocol"] == "xd":
            target = next(d for d in DATASETS if d != r["dataset"])
            evaluation = load_eval_features(params.features.dir, eval_list_path(params.data.splits_dir, target),
                                            config)
            recorded = next(float(t["test_acc"]) for t in transfer if t["trial_key"] == r["trial_key"])
            assert learned_accuracy(backbone, tensors, meta, evaluation) == pytest.approx(recorded)
            run = client.get_run(r["mlflow_run_id"])
            assert run.data.metrics[f"xd_acc.{target}"] == pytest.approx(recorded)
            assert run.data.tags["protocol"] == "xd" and run.data.tags[KEY_TAG] == r["trial_key"]
    summary = read_csv(results / "summary.csv")
    best = [s for s in summary if s["best"] == "True"]
    # One best configuration per dataset x protocol (the three methods compete within a protocol).
    assert sorted((s["dataset"], s["protocol"]) for s in best) == sorted(
        (d, p) for d in DATASETS for p in ("fewshot", "base2new", "xd"))
    assert all(s["h_acc"] != "" for s in summary if s["protocol"] == "base2new")
    parents = [r for r in client.search_runs([run.info.experiment_id]) if PARENT_TAG not in r.data.tags]
    assert any(k.startswith("best_h_acc.") for k in parents[0].data.metrics)


def test_a_transfer_target_without_features_fails_before_any_trial(world: tuple[Path, dict[str, Any]]) -> None:
    path, raw = world
    params = load_params(path)
    import dataclasses

    params = dataclasses.replace(params, transfer=dataclasses.replace(params.transfer, targets=["WorldPastel"]),
                                 sweep=dataclasses.replace(params.sweep, space={"protocol": ["xd"]},
                                                           name="no-target"))
    with pytest.raises(MissingInputsError, match="transfer target 'WorldPastel'.*stages.features"):
        run_sweep(params, SweepOptions(verbose=0))
    assert not (Path(raw["sweep"]["storage"]) / "no-target").exists()  # nothing started
