"""Fused trial bundles in the sweep: which configurations share a Ray trial, and that a bundled sweep records,
stops, fails and resumes each configuration as an unbundled sweep does (real Ray, MLflow, demo features)."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import pytest
import ray
import torch
from mlflow import MlflowClient
from sweep_helpers import DemoWorkspace, interrupt_when

from pipeline.engine.context import load_context
from pipeline.params import ParamsError, load_params, override, params_from_dict
from pipeline.sweep.bundle_trial import BUNDLE_TAG
from pipeline.sweep.plan import (
    BUNDLE,
    CPU_AUTO_BUNDLE,
    MEMBERS,
    BundleRule,
    auto_bundle_size,
    form_bundles,
    members_of,
    plan_sweep,
)
from pipeline.sweep.searchers import BundlingSearcher, build_searcher
from pipeline.sweep.space import complete, trial_key
from pipeline.sweep.tuner import SweepOptions, run_sweep
from pipeline.tracking import KEY_TAG, REASON_TAG


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def children_of(uri: str, experiment: str) -> list[Any]:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return [r for r in runs if KEY_TAG in r.data.tags]


def config(**values: Any) -> dict[str, Any]:
    base = {"dataset": "D", "shots": 1, "seed": 1, "n_ctx": 4, "ctx_init": "", "csc": False,
            "class_token_position": "end", "lr": 0.002, "epochs": 2, "precision": "fp32"}
    return complete(base | values)


def rule(size: int | str = 3, gpu: bool = False, online: bool = False, classes: int = 10,
         train: Any = 10) -> BundleRule:
    return BundleRule(size, gpu, online, lambda c: classes, train if callable(train) else lambda c: train, 32)


def bundles(configs: list[dict[str, Any]], size: int | str = 3, **kw: Any) -> list[dict[str, Any]]:
    return form_bundles(configs, rule(size, **kw))


def test_members_share_what_one_fused_step_needs() -> None:
    seeds = [config(seed=s, n_ctx=n) for s in (1, 2) for n in (4, 8)]
    other_shots = [config(shots=2, seed=s) for s in (1, 2)]
    trials = bundles(seeds + other_shots + [config(epochs=5)], size=3)
    assert [[c["seed"] for c in members_of(t)] for t in trials] == [[1, 1, 2], [2], [1, 2], [1]]
    assert BUNDLE in trials[0] and BUNDLE not in trials[1] and BUNDLE not in trials[3]  # one alone: a plain trial
    # Every configuration exactly once, in the plan's order within each bundle.
    flat = [trial_key(c) for t in trials for c in members_of(t)]
    assert sorted(flat) == sorted(trial_key(c) for c in seeds + other_shots + [config(epochs=5)])
    # What members must share splits them: protocol, precision, batch size, training-set size.
    assert len(bundles([config(), config(protocol="base2new")])) == 2
    assert len(bundles([config(), config(precision="bf16")])) == 2
    assert len(bundles([config(), config(batch_size=8)])) == 2
    assert len(bundles([config(seed=1), config(seed=2)], train=lambda c: 10 + c["seed"])) == 2


def test_other_methods_and_online_crops_train_alone() -> None:
    mixed = [config(), config(method="cocoop", n_ctx=4), config(seed=2), config(method="kgcoop", kg_weight=8.0)]
    trials = bundles(mixed, size=4)
    assert [len(members_of(t)) for t in trials] == [2, 1, 1]
    assert all(c["method"] == "coop" for c in members_of(trials[0]))
    assert all(BUNDLE not in t for t in bundles([config(), config(seed=2)], size=4, online=True))
    assert bundles([config(), config(seed=2)], size=1) == [config(), config(seed=2)]


def test_auto_size_is_one_on_cpus_and_fills_a_gpu_step() -> None:
    assert auto_bundle_size(100, gpu=False) == CPU_AUTO_BUNDLE
    assert auto_bundle_size(100, gpu=True) == 16  # 1,600 class prompts a step
    assert auto_bundle_size(1000, gpu=True) == 2
    assert auto_bundle_size(2000, gpu=True) == 1
    assert auto_bundle_size(5, gpu=True) == 64  # capped
    configs = [config(seed=s, n_ctx=n) for s in (1, 2, 3) for n in (4, 8, 16)]
    assert len(bundles(configs, size="auto", gpu=True, classes=400)) == 3  # 4 a bundle at 400 classes
    assert len(bundles(configs, size="auto", gpu=False)) == math.ceil(9 / CPU_AUTO_BUNDLE)


def test_bundle_size_is_checked(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("sweep:\n  bundle_size: 0\n")
    with pytest.raises(ParamsError, match="sweep.bundle_size"):
        load_params(path)
    path.write_text("sweep:\n  bundle_size: big\n")
    with pytest.raises(ParamsError, match="sweep.bundle_size"):
        load_params(path)
    path.write_text("sweep:\n  bundle_size: 4\n")
    assert load_params(path).sweep.bundle_size == 4
    assert override(load_params(path), sweep={"bundle_size": "auto"}).sweep.bundle_size == "auto"


def optuna_plan(num_samples: int) -> Any:
    return plan_sweep(params_from_dict({
        "data": {"datasets": ["FashionMNIST"], "shots": [1, 2], "seeds": [1, 2]},
        "sweep": {"search": "optuna", "num_samples": num_samples,
                  "space": {"n_ctx": [1, 2, 4, 8, 16], "lr": [0.001, 0.002, 0.004]}}}))


def test_optuna_suggestions_are_gathered_into_bundles_and_each_member_is_told_its_result() -> None:
    """TPE's batched asks: bundles of up to 4 configurations that share the step; a suggestion that cannot
    share one waits for the next trial; each member's own val_acc (or failure) reaches the study."""
    plan = optuna_plan(num_samples=12)
    searcher = build_searcher(plan, 0, rule=rule(size=4))
    assert isinstance(searcher, BundlingSearcher)
    searcher.set_search_properties("val_acc", "max", {})
    handed: list[dict[str, Any]] = []
    finished_values, failed_values = set(), set()
    trial = 0
    while (suggestion := searcher.suggest(f"t{trial}")) not in (None, "FINISHED"):
        members = [complete(c) for c in members_of(suggestion)]
        assert 1 <= len(members) <= 4
        assert len({(c["shots"], c["epochs"]) for c in members}) == 1  # what a fused step shares
        handed += members
        keys = [trial_key(c) for c in members]
        values = {key: 10.0 * trial + i for i, key in enumerate(keys)}
        failed = keys[-1] if len(keys) > 1 else None
        report = {MEMBERS: {k: {"state": "FAILED" if k == failed else "FINISHED", "val_acc": v}
                            for k, v in values.items()}} if len(keys) > 1 else {"val_acc": values[keys[0]]}
        searcher.on_trial_complete(f"t{trial}", report)
        finished_values |= {v for k, v in values.items() if k != failed}
        failed_values |= {v for k, v in values.items() if k == failed}
        trial += 1
    assert len(handed) == 12 and len({trial_key(c) for c in handed}) == 12  # the budget, no repeats
    assert trial < 12  # fewer Ray trials than configurations
    study = searcher.searcher.searcher._ot_study
    told = {t.value for t in study.trials if t.value is not None}
    assert failed_values and finished_values <= told and not failed_values & told  # each member its own outcome
    assert sum(t.state.name == "FAIL" for t in study.trials) == len(failed_values)


def test_bundling_searcher_state_survives_a_driver_restart(tmp_path: Path) -> None:
    from ray.tune.search import SearchGenerator

    plan = optuna_plan(num_samples=10)
    first = build_searcher(plan, 0, rule=rule(size=4))
    first.set_search_properties("val_acc", "max", {})
    one = [trial_key(c) for c in members_of(first.suggest("t0"))]
    SearchGenerator(first).save_to_dir(str(tmp_path), "driver-1")
    second = build_searcher(plan, 0, rule=rule(size=4))
    second.set_search_properties("val_acc", "max", {})
    SearchGenerator(second).restore_from_dir(str(tmp_path))
    assert second.get_state() == first.get_state()
    later = []
    while (suggestion := second.suggest(f"t{len(later) + 1}")) not in (None, "FINISHED"):
        later += [trial_key(c) for c in members_of(suggestion)]
    assert len(one) + len(later) == 10 and not set(one) & set(later)


def test_optuna_without_bundles_keeps_its_searcher() -> None:
    plan = optuna_plan(num_samples=4)
    assert not isinstance(build_searcher(plan, 0, rule=rule(size="auto")), BundlingSearcher)  # CPU: auto is 1
    assert not isinstance(build_searcher(plan, 0, rule=rule(size=4, online=True)), BundlingSearcher)


@pytest.fixture(scope="module")
def ray_session() -> Any:
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def sweep_params(ws: DemoWorkspace, name: str, bundle_size: int, **sweep: Any) -> Any:
    root = ws.root / name
    return load_params(ws.params(
        name,
        data={"shots": [2], "seeds": [1, 2]},
        train={"epochs": 4, "eval_every": 1},
        sweep={"space": {"n_ctx": [4], "csc": [False, True], "class_token_position": ["end", "front"],
                         "lr": [0.002, 1e30]},
               "bundle_size": bundle_size, "max_concurrent": 2, "retries": 0, "storage": str(root / "ray"),
               "results_dir": str(root / "results")} | sweep,
        tracking={"uri": f"sqlite:///{root}/mlflow.db", "experiment": name},
    ))


@pytest.mark.slow
def test_a_bundled_sweep_records_each_configuration_as_an_unbundled_one(demo_ws: DemoWorkspace,
                                                                         ray_session: Any) -> None:
    """16 configurations (2 seeds x CSC x position x lr, half with a diverging lr) in bundles of 8 against one
    configuration per trial: the same states, accuracies and learned contexts; a NaN fails its member only."""
    alone = run_sweep(sweep_params(demo_ws, "bundles-alone", 1), SweepOptions(verbose=0))
    bundled = run_sweep(sweep_params(demo_ws, "bundles-bundled", 8), SweepOptions(verbose=0))
    assert len({r.trial_id for r in bundled.records}) == 2  # two Ray trials of 8 configurations
    assert len({r.trial_id for r in alone.records}) == 16
    by_key = {r.trial_key: r for r in alone.records}
    assert {r.trial_key for r in bundled.records} == set(by_key)
    for record in bundled.records:
        reference = by_key[record.trial_key]
        assert record.state == reference.state, record.config
        if record.config["lr"] > 1:
            assert record.state == "FAILED" and "NonFiniteLossError" in record.reason
            continue
        assert record.state == "FINISHED"
        assert record.val_acc == pytest.approx(reference.val_acc, abs=1e-9)
        assert record.test_acc == pytest.approx(reference.test_acc, abs=1e-9)
        ours = load_context(demo_ws.root / "bundles-bundled" / "results" / "contexts" / record.trial_key / "ctx.safetensors")
        theirs = load_context(demo_ws.root / "bundles-alone" / "results" / "contexts" / record.trial_key / "ctx.safetensors")
        torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=1e-5)

    uri = f"sqlite:///{demo_ws.root / 'bundles-bundled'}/mlflow.db"
    client = MlflowClient(uri)
    runs = children_of(uri, "bundles-bundled")
    assert len(runs) == 16 and {r.data.tags[KEY_TAG] for r in runs} == set(by_key)  # one run per configuration
    trial_of = {r.trial_key: r.trial_id for r in bundled.records}
    for run in runs:
        key = run.data.tags[KEY_TAG]
        assert run.data.tags[BUNDLE_TAG] == trial_of[key] and run.data.tags["sweep.bundle_size"] == "8"
        if run.data.params["lr"] == "1e+30":
            assert run.info.status == "FAILED" and "NonFiniteLossError" in run.data.tags[REASON_TAG]
            continue
        assert run.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4]
        assert "ctx.safetensors" in {a.path for a in client.list_artifacts(run.info.run_id)}
    rows = read_csv(demo_ws.root / "bundles-bundled" / "results" / "trials.csv")
    assert len(rows) == 16 and sorted(r["state"] for r in rows) == ["FAILED"] * 8 + ["FINISHED"] * 8


@pytest.mark.slow
def test_asha_stops_a_member_not_its_bundle(demo_ws: DemoWorkspace, ray_session: Any) -> None:
    """ASHA (grace 1, reduction 3: rungs at epochs 1 and 3 of 9) acts per configuration in a bundled sweep: a
    bundle keeps training its good members after a weak one is stopped."""
    root = demo_ws.root / "bundles-asha"
    params = load_params(demo_ws.params(
        "bundles-asha",
        data={"shots": [2], "seeds": [1, 2]},
        train={"epochs": 9, "eval_every": 1},
        sweep={"space": {"lr": [0.0005, 0.002, 0.01, 0.05, 0.2]}, "bundle_size": 5, "max_concurrent": 1,
               "asha": True, "asha_grace_epochs": 1, "asha_reduction_factor": 3, "storage": str(root / "ray"),
               "results_dir": str(root / "res")},
        tracking={"uri": f"sqlite:///{root}/mlflow.db", "experiment": "asha"},
    ))
    outcome = run_sweep(params, SweepOptions(verbose=0))
    records = outcome.records
    assert len({r.trial_id for r in records}) == 2 and len(records) == 10  # a bundle per seed
    stopped = [r for r in records if r.state == "STOPPED"]
    assert stopped, "ASHA stopped no configuration"
    for record in records:
        assert record.last_epoch in ((1, 3) if record.state == "STOPPED" else (9,)), record
    assert any(r.state == "FINISHED" and r.trial_id in {s.trial_id for s in stopped} for r in records), (
        "a bundle with a stopped member should go on with the others")
    runs = {r.data.tags[KEY_TAG]: r for r in children_of(f"sqlite:///{root}/mlflow.db", "asha")}
    for record in stopped:
        run = runs[record.trial_key]
        assert run.info.status == "KILLED"
        assert f"stopped early by ASHA at epoch {record.last_epoch}" in run.data.tags[REASON_TAG]
    assert (root / "ray" / f"{outcome.name}.rungs.json").is_file()  # what a resumed driver's ASHA goes on from


@pytest.mark.slow
def test_an_interrupted_bundled_sweep_resumes_without_retraining(demo_ws: DemoWorkspace, ray_session: Any) -> None:
    """Bundles of 2, one at a time; interrupted (Tune's graceful stop, as Ctrl-C) once a bundle has finished,
    then --resume: finished members keep their runs, every configuration finishes once."""
    root = demo_ws.root / "bundles-resume"
    uri = f"sqlite:///{root}/mlflow.db"
    params = load_params(demo_ws.params(
        "bundles-resume",
        data={"shots": [1], "seeds": [1, 2]},
        train={"epochs": 3000, "eval_every": 0},  # 1 step an epoch: a bundle trains for 10-30 s
        sweep={"space": {"n_ctx": [4, 8]}, "bundle_size": 2, "max_concurrent": 1, "storage": str(root / "ray"),
               "results_dir": str(root / "results"), "name": "bundled-resume"},
        tracking={"uri": uri, "experiment": "resume"},
    ))
    def a_bundle_finished() -> bool:
        return sum(r.info.status == "FINISHED" for r in children_of(uri, "resume")) >= 2

    with interrupt_when(a_bundle_finished):
        first = run_sweep(params, SweepOptions(verbose=0))
    assert first.interrupted
    done_before = {r.data.tags[KEY_TAG]: r for r in children_of(uri, "resume") if r.info.status == "FINISHED"}
    assert len(done_before) == 2  # the first bundle
    assert all(r.info.status != "RUNNING" for r in children_of(uri, "resume"))

    second = run_sweep(params, SweepOptions(resume="latest", verbose=0))
    assert not second.interrupted and second.counts["finished"] == 4
    finished = [r for r in children_of(uri, "resume") if r.info.status == "FINISHED"]
    assert sorted(r.data.tags[KEY_TAG] for r in finished) == sorted({r.data.tags[KEY_TAG] for r in finished})
    assert len(finished) == 4
    for key, before in done_before.items():
        after = next(r for r in finished if r.data.tags[KEY_TAG] == key)
        assert after.info.run_id == before.info.run_id and after.info.end_time == before.info.end_time
    assert {r["state"] for r in read_csv(root / "results" / "trials.csv")} == {"FINISHED"}


@pytest.mark.slow
def test_an_optuna_sweep_bundles_its_suggestions(demo_ws: DemoWorkspace, ray_session: Any,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """TPE's suggestions in bundles of up to 4: 8 configurations in fewer Ray trials, each its own run and row;
    the progress line counts configurations."""
    root = demo_ws.root / "bundles-optuna"
    params = load_params(demo_ws.params(
        "bundles-optuna",
        data={"shots": [1], "seeds": [1, 2]},
        train={"epochs": 3, "eval_every": 1},
        sweep={"search": "optuna", "num_samples": 8, "bundle_size": 4,
               "space": {"n_ctx": [2, 4, 8, 16], "lr": [0.001, 0.002, 0.004]}, "storage": str(root / "ray"),
               "results_dir": str(root / "res")},
        tracking={"uri": f"sqlite:///{root}/mlflow.db", "experiment": "optuna"},
    ))
    with caplog.at_level("INFO"):
        outcome = run_sweep(params, SweepOptions(verbose=0, progress_every_s=0))
    assert outcome.counts["finished"] == 8 and not outcome.interrupted
    assert len({r.trial_id for r in outcome.records}) < 8
    assert len({r.trial_key for r in outcome.records}) == 8
    runs = children_of(f"sqlite:///{root}/mlflow.db", "optuna")
    assert len(runs) == 8 and all(r.info.status == "FINISHED" for r in runs)
    progress = [r.getMessage() for r in caplog.records if r.name == "pipeline.sweep.callbacks"]
    assert progress[-1].startswith(f"sweep {outcome.name}: 8/8 trials done (0 failed), 0 running, 0 waiting;")
