"""The sweep end to end on the demo dataset: real Ray Tune (one local session for the module), real MLflow
(SQLite), real feature caches built by the prepare/features stages. The command's full run on a Ray cluster
and an MLflow server is in test_cluster.py; planning and resume state in test_sweep_plan.py and
test_sweep_resume.py, the command line and --dry-run in test_stages_sweep.py."""

from __future__ import annotations

import csv
import json
import logging
import math
import socket
import statistics
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import ray
from mlflow import MlflowClient
from sweep_helpers import DemoWorkspace, free_port, interrupt_when

from pipeline.engine.backbone import count_tokens
from pipeline.engine.context import load_context
from pipeline.params import load_params
from pipeline.sweep.cluster import check_ray_address
from pipeline.sweep.inputs import MissingInputsError
from pipeline.sweep.plan import SweepError
from pipeline.sweep.results import ConfigSummary, TrialRecord, select_best, summarize
from pipeline.sweep.space import trial_key
from pipeline.sweep.tuner import SweepOptions, run_sweep
from pipeline.tracking import KEY_TAG, PARENT_TAG, REASON_TAG
from stages.sweep import main as cli_main

WORDS = "a photo of a"


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def experiment_runs(uri: str, experiment: str) -> tuple[list[Any], list[Any]]:
    """(parents, children) of an MLflow experiment."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000) if exp else []
    return [r for r in runs if PARENT_TAG not in r.data.tags], [r for r in runs if PARENT_TAG in r.data.tags]


# ------------------------------------------------------------------------------------------ result tables


def record(config: dict, val: float, test: float, state: str = "FINISHED") -> TrialRecord:
    return TrialRecord(config=config, trial_key=trial_key(config), state=state, val_acc=val, test_acc=test)


def test_best_is_chosen_on_validation_never_test() -> None:
    base = {"dataset": "D", "shots": 4, "n_ctx": 16, "ctx_init": "", "csc": False, "class_token_position": "end",
            "lr": 0.002, "epochs": 10, "precision": "fp32"}
    a, b, c = ({**base, "n_ctx": n} for n in (4, 8, 16))
    records = [
        record({**a, "seed": 1}, val=70, test=99), record({**a, "seed": 2}, val=72, test=97),  # best test
        record({**b, "seed": 1}, val=80, test=60), record({**b, "seed": 2}, val=84, test=62),  # best val
        record({**c, "seed": 1}, val=95, test=50),  # best val but one seed only
        record({**c, "seed": 2}, val=0, test=0, state="FAILED"),
    ]
    summaries = {s.config["n_ctx"]: s for s in summarize(records)}
    assert [n for n, s in summaries.items() if s.best] == [8]
    assert summaries[8].val_mean == 82 and summaries[8].row()["val_acc_std"] == 2.0
    assert summaries[4].test_mean == 98 and summaries[4].row()["test_acc_std"] == 1.0
    assert summaries[16].seeds == [1]  # the failed seed is not averaged in
    assert select_best([ConfigSummary("D", 4, "x", a, [1], [math.nan], [1.0])]) is None


# ------------------------------------------------------------------------- in-process, one Ray session


@pytest.fixture(scope="module")
def ray_session() -> Any:
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.mark.slow
def test_interrupted_sweep_resumes_without_duplicates(demo_ws: DemoWorkspace,
                                                      ray_session: Any) -> None:
    """Interrupt a sweep the way Ctrl-C does (Tune's graceful stop), then --resume it."""
    epochs = 150
    root = demo_ws.root / "resume"
    params = load_params(demo_ws.params(
        "resume",
        data={"shots": [1]},
        train={"epochs": epochs, "eval_every": 0},
        sweep={"space": {"n_ctx": [4, 8]}, "max_concurrent": 1, "storage": str(root / "ray"),
               "results_dir": str(root / "results"), "name": "resumable"},
        tracking={"uri": f"sqlite:///{root}/mlflow.db", "experiment": "resume"},
    ))
    uri = f"sqlite:///{root}/mlflow.db"
    n_trials = 4  # n_ctx x seeds
    def a_trial_finished() -> bool:
        return any(r.info.status == "FINISHED" for r in experiment_runs(uri, "resume")[1])

    with interrupt_when(a_trial_finished):
        first = run_sweep(params, SweepOptions(verbose=0))
    assert first.interrupted

    _, children = experiment_runs(uri, "resume")
    done_before = {r.data.tags[KEY_TAG]: r for r in children if r.info.status == "FINISHED"}
    assert 1 <= len(done_before) < n_trials, "the interruption should leave unfinished trials"
    assert all(r.info.status != "RUNNING" for r in children)
    partial = read_csv(root / "results" / "trials.csv")
    assert len(partial) == n_trials and {r["state"] for r in partial} == {"FINISHED", "UNFINISHED"}

    second = run_sweep(params, SweepOptions(resume="latest", verbose=0))
    assert not second.interrupted and second.counts["finished"] == n_trials

    parents, children = experiment_runs(uri, "resume")
    assert len(parents) == 1 and parents[0].info.run_id == first.parent_run_id == second.parent_run_id
    finished = [r for r in children if r.info.status == "FINISHED"]
    keys = [r.data.tags[KEY_TAG] for r in finished]
    assert len(keys) == len(set(keys)) == n_trials  # each trial finished exactly once
    # A trial the interruption stopped kept its first attempt's run (KILLED, with a reason); its second
    # attempt is a new run that links to it, so neither run's curve repeats epochs.
    for run in children:
        assert run.info.status in ("FINISHED", "KILLED")
        if run.info.status == "KILLED":
            assert run.data.tags[REASON_TAG]
            assert any(r.data.tags.get("sweep.previous_attempt") == run.info.run_id for r in finished)
    client = MlflowClient(uri)
    for key, before in done_before.items():
        after = next(r for r in finished if r.data.tags[KEY_TAG] == key)
        assert after.info.run_id == before.info.run_id
        assert after.info.end_time == before.info.end_time  # not trained again
    for run in finished:
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(1, epochs + 1))
    rows = read_csv(root / "results" / "trials.csv")
    assert len(rows) == n_trials and {r["state"] for r in rows} == {"FINISHED"}
    assert {r["mlflow_run_id"] for r in rows} == {r.info.run_id for r in finished}
    assert sorted(p.name for p in (root / "ray").iterdir() if p.is_dir()) == ["resumable"]
    assert sorted(p.name for p in (root / "results" / "contexts").iterdir()) == sorted(keys)


@pytest.mark.slow
def test_optuna_sweep_end_to_end(demo_ws: DemoWorkspace, ray_session: Any, caplog: pytest.LogCaptureFixture) -> None:
    root = demo_ws.root / "optuna"
    space = {"n_ctx": [4, 8], "ctx_init": ["", WORDS], "csc": [False, True], "lr": [0.002, 0.02]}
    params_path = demo_ws.params(
        "optuna",
        data={"shots": [1, 2], "seeds": [1, 2]},
        train={"epochs": 3, "eval_every": 2},
        sweep={"search": "optuna", "space": space, "num_samples": 6, "storage": str(root / "ray"),
               "results_dir": str(root / "res")},
        tracking={"uri": f"sqlite:///{root}/mlflow.db", "experiment": "opt"},
    )
    params = load_params(params_path)
    with caplog.at_level(logging.INFO):
        outcome = run_sweep(params, SweepOptions(verbose=0, progress_every_s=0))  # a progress line every step
    assert outcome.counts["total"] == 6 and outcome.counts["finished"] == 6 and not outcome.interrupted

    # The console: progress lines with an ETA once a trial ended, a last line, the best-by-validation table.
    progress = [r.getMessage() for r in caplog.records if r.name == "pipeline.sweep.callbacks"]
    assert any(" waiting; " in line and ", ETA " in line for line in progress)
    assert progress[-1].startswith(f"sweep {outcome.name}: 6/6 trials done (0 failed), 0 running, 0 waiting;")
    assert progress[-1].endswith("all ended")
    (table,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("best configuration per dataset")]

    rows = read_csv(root / "res" / "trials.csv")
    assert len(rows) == 6 and len({r["trial_key"] for r in rows}) == 6
    for r in rows:
        assert r["state"] == "FINISHED" and r["node_ip"] and r["mlflow_run_id"]
        if r["ctx_init"]:
            assert r["csc"] == "False" and int(r["n_ctx"]) == count_tokens(WORDS)

    uri = f"sqlite:///{root}/mlflow.db"
    parents, children = experiment_runs(uri, "opt")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.metrics["trials_finished"] == 6
    assert parents[0].data.params["backbone"] == "coop-tiny/random"
    assert {c.info.run_id for c in children} == {r["mlflow_run_id"] for r in rows}
    client = MlflowClient(uri)
    for child in children:
        assert child.info.status == "FINISHED"
        tags, params_logged = child.data.tags, child.data.params
        for tag in ("git_commit", "feature_cache", "dataset", "shots", "seed", "backbone", "node_ip",
                    "ray.trial_id"):
            assert tags.get(tag), tag
        assert tags["backbone"] == "coop-tiny/random"  # the parent's name for the same backbone
        assert {"n_ctx", "ctx_init", "csc", "class_token_position", "lr", "epochs", "train.momentum",
                "features.views_per_seed", "features.online_workers"} <= set(params_logged)
        assert [m.step for m in client.get_metric_history(child.info.run_id, "loss")] == [1, 2, 3]
        # val_acc every train.eval_every epochs and at the last, as the README promises.
        assert [m.step for m in client.get_metric_history(child.info.run_id, "val_acc")] == [2, 3]
        assert {"train_acc", "lr", "test_acc", "val_acc"} <= set(child.data.metrics)
        row = next(r for r in rows if r["mlflow_run_id"] == child.info.run_id)
        assert child.data.metrics["test_acc"] == pytest.approx(float(row["test_acc"]), abs=1e-3)

    # Artifacts of one trial: the context loads, its nearest words and config describe it.
    child = children[0]
    local = Path(client.download_artifacts(child.info.run_id, "", str(root / "download")))
    ctx, meta = load_context(local / "ctx.safetensors")
    config = json.loads((local / "config.json").read_text())
    assert config["trial_key"] == child.data.tags[KEY_TAG]
    assert meta.n_ctx == ctx.shape[-2] == int(child.data.params["n_ctx"])
    assert meta.csc == (child.data.params["csc"] == "True") and meta.dataset == "FashionMNIST"
    words = json.loads((local / "nearest_words.json").read_text())
    assert len(words["vectors"]) == ctx.shape[-2] * (len(meta.classnames) if meta.csc else 1)
    assert (local / "nearest_words.txt").read_text().count("\n") == len(words["vectors"])

    # Every finished trial's context was copied next to the tables, as predict/report expect.
    contexts = root / "res" / "contexts"
    assert sorted(p.name for p in contexts.iterdir()) == sorted(r["trial_key"] for r in rows)
    for r in rows:
        ctx, meta = load_context(contexts / r["trial_key"] / "ctx.safetensors")
        assert meta.extra["trial_key"] == r["trial_key"] and meta.seed == int(r["seed"])
        assert ctx.shape[-2] == int(r["n_ctx"])

    # summary.csv: mean/std over seeds recomputed here from trials.csv; best by validation.
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["dataset"], r["shots"], r["config"])].append(r)
    summary = read_csv(root / "res" / "summary.csv")
    assert len(summary) == len(groups)
    for s in summary:
        members = groups[(s["dataset"], s["shots"], s["config"])]
        vals = [float(m["val_acc"]) for m in members]
        tests = [float(m["test_acc"]) for m in members]
        assert int(s["n_seeds"]) == len(members)
        assert float(s["val_acc_mean"]) == pytest.approx(statistics.fmean(vals), abs=1e-3)
        assert float(s["test_acc_std"]) == pytest.approx(statistics.pstdev(tests), abs=1e-3)
    metrics = {f.name: json.loads(f.read_text()) for f in (root / "res" / "metrics").iterdir()}
    assert len(metrics) == len(_by_setting(summary)) and sum(m["finished"] for m in metrics.values()) == 6
    for (dataset, shots), members in _by_setting(summary).items():
        most = max(int(m["n_seeds"]) for m in members)
        best = max((m for m in members if int(m["n_seeds"]) == most), key=lambda m: float(m["val_acc_mean"]))
        assert [m["best"] for m in members].count("True") == 1 and best["best"] == "True"
        entry = metrics[f"{dataset}-{shots}shot.json"]
        assert entry["val_acc"] == float(best["val_acc_mean"]) and entry["test_acc"] == float(best["test_acc_mean"])
    best_rows = sorted(((s["dataset"], s["shots"], s["config"], s["n_seeds"]) for s in summary if s["best"] == "True"),
                       key=lambda row: (row[0], int(row[1])))
    table_rows = [[c.strip() for c in line.split("  ") if c.strip()] for line in table.splitlines()[2:]]
    assert [tuple(row[:4]) for row in table_rows] == best_rows  # the end table is summary.csv's best rows
    plots = read_csv(root / "res" / "plots.csv")
    assert sorted((p["dataset"], p["config"], p["shots"]) for p in plots) == sorted(
        (s["dataset"], s["config"], s["shots"]) for s in summary)  # one row each, no repeats for the best
    assert {(p["dataset"], p["config"]) for p in plots if p["best_by_val"] == "yes"} == {
        (s["dataset"], s["config"]) for s in summary if s["best"] == "True"}


def _by_setting(summary: list[dict]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = defaultdict(list)
    for s in summary:
        out[(s["dataset"], s["shots"])].append(s)
    return out


@pytest.mark.slow
def test_failing_trial_is_marked_failed_retried_and_the_sweep_goes_on(demo_ws: DemoWorkspace,
                                                                      ray_session: Any) -> None:
    root = demo_ws.root / "failing"
    params_path = demo_ws.params(
        "failing",
        data={"shots": [1], "seeds": [1]},
        train={"epochs": 3, "eval_every": 0},
        sweep={"space": {"lr": [0.002, 1e30]}, "retries": 1, "storage": str(root / "ray"),
               "results_dir": str(root / "res")},
        tracking={"uri": f"sqlite:///{root}/mlflow.db", "experiment": "fail"},
    )
    outcome = run_sweep(load_params(params_path), SweepOptions(verbose=0))
    assert outcome.counts["finished"] == 1 and outcome.counts["failed"] == 1
    rows = {float(r["lr"]): r for r in read_csv(root / "res" / "trials.csv")}
    assert rows[0.002]["state"] == "FINISHED"
    assert rows[1e30]["state"] == "FAILED" and "NonFiniteLossError" in rows[1e30]["reason"]
    _, children = experiment_runs(f"sqlite:///{root}/mlflow.db", "fail")
    # The retry is a second attempt in a run of its own, linked to the first: each run holds one attempt's curve.
    assert len(children) == 3
    failed = sorted((c for c in children if c.data.params["lr"] == "1e+30"), key=lambda c: c.data.tags["sweep.attempt"])
    assert [c.data.tags["sweep.attempt"] for c in failed] == ["1", "2"]
    assert failed[1].data.tags["sweep.previous_attempt"] == failed[0].info.run_id
    for run in failed:
        assert run.info.status == "FAILED" and "NonFiniteLossError" in run.data.tags[REASON_TAG]
    assert rows[1e30]["mlflow_run_id"] == failed[1].info.run_id  # the table points at the latest attempt


@pytest.mark.slow
def test_asha_stops_weak_trials_at_its_rungs_and_says_so(demo_ws: DemoWorkspace,
                                                          ray_session: Any) -> None:
    """9 epochs, grace 1, reduction factor 3: ASHA's rungs are epochs 1 and 3. Trials run one at a time so
    each rung decision compares against the trials before it."""
    root = demo_ws.root / "asha"
    uri = f"sqlite:///{root}/mlflow.db"
    params_path = demo_ws.params(
        "asha",
        data={"shots": [2], "seeds": [1, 2]},
        train={"epochs": 9, "eval_every": 1},
        sweep={"space": {"lr": [0.0005, 0.002, 0.01, 0.05, 0.2]}, "max_concurrent": 1, "asha": True, "asha_grace_epochs": 1,
               "asha_reduction_factor": 3, "storage": str(root / "ray"), "results_dir": str(root / "res")},
        tracking={"uri": uri, "experiment": "asha"},
    )
    outcome = run_sweep(load_params(params_path), SweepOptions(verbose=0))
    rows = read_csv(root / "res" / "trials.csv")
    assert len(rows) == 10 and {r["state"] for r in rows} <= {"FINISHED", "STOPPED"}
    stopped = [r for r in rows if r["state"] == "STOPPED"]
    assert stopped, "ASHA stopped no trial"
    assert outcome.counts["finished"] == 10 - len(stopped) and outcome.counts["stopped"] == len(stopped)
    for row in rows:
        assert int(row["last_epoch"]) in ((1, 3) if row["state"] == "STOPPED" else (9,))

    _, children = experiment_runs(uri, "asha")
    client = MlflowClient(uri)
    curves = {}
    for child in children:
        history = client.get_metric_history(child.info.run_id, "val_acc")
        curves[child.data.tags[KEY_TAG]] = {m.step: m.value for m in history}
    by_key = {r["trial_key"]: r for r in rows}
    assert set(curves) == set(by_key)
    for key, row in by_key.items():
        last = int(row["last_epoch"])
        assert sorted(curves[key]) == list(range(1, last + 1))  # one validation per epoch run, none after
        if row["state"] == "STOPPED":
            run = next(c for c in children if c.data.tags[KEY_TAG] == key)
            assert f"stopped early by ASHA at epoch {last}" in run.data.tags[REASON_TAG]
            # Stopped at a rung only for being below another trial's accuracy at that rung.
            assert any(other[last] > curves[key][last] for k, other in curves.items() if k != key and last in other)
    # The best trial at the first rung is never stopped there.
    rung1 = {k: c[1] for k, c in curves.items()}
    leader = max(rung1, key=rung1.get)
    assert int(by_key[leader]["last_epoch"]) > 1


@pytest.mark.slow
def test_unreachable_services_and_missing_features_fail_before_any_trial(demo_ws: DemoWorkspace,
                                                                         ray_session: Any) -> None:
    root = demo_ws.root / "errors"
    params = load_params(demo_ws.params(
        "errors", sweep={"storage": str(root / "ray"), "results_dir": str(root / "res")},
        tracking={"uri": f"sqlite:///{root}/mlflow.db"},
    ))
    dead = f"127.0.0.1:{free_port()}"
    for with_address, options, needle in (
        (replace(params, sweep=replace(params.sweep, address=dead)), SweepOptions(), "does not answer"),
        (params, SweepOptions(tracking_uri=f"http://{dead}"), "does not answer"),
    ):
        start = time.monotonic()
        with pytest.raises(SweepError, match=needle) as info:
            run_sweep(with_address, options)
        assert time.monotonic() - start < 15
        assert dead in str(info.value)
    listener = socket.socket()  # accepts connections, never speaks Ray
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    try:
        start = time.monotonic()
        with pytest.raises(SweepError, match="does not answer as a Ray cluster"):
            check_ray_address(f"127.0.0.1:{listener.getsockname()[1]}", timeout=2, probe_timeout=5)
        assert time.monotonic() - start < 12
    finally:
        listener.close()
    no_features = load_params(demo_ws.params(
        "nofeat", features={"dir": str(root / "empty")}, sweep={"storage": str(root / "ray")},
        tracking={"uri": f"sqlite:///{root}/mlflow.db"},
    ))
    with pytest.raises(MissingInputsError, match="dvc repro features") as info:
        run_sweep(no_features, SweepOptions())
    assert "FashionMNIST" in str(info.value) and "stages.features" in str(info.value)
    assert not (root / "ray").exists() and not (root / "res").exists()


@pytest.mark.slow
def test_online_augmentation_trial(demo_ws: DemoWorkspace, ray_session: Any,
                                   capsys: pytest.CaptureFixture) -> None:
    """features.views: online through the sweep: a cache without train views, one trial cropping the demo's
    images itself (they are on this machine's disk, as a shared filesystem would provide them)."""
    import warnings

    from pipeline.engine.backbone import load_backbone
    from pipeline.features.build import build_dataset_features

    root = demo_ws.root / "online"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone = load_backbone("coop-tiny", None)
    build_dataset_features(root / "features", demo_ws.base["data"]["root"], demo_ws.root / "splits", "FashionMNIST",
                           [1], [1], backbone, views="online", progress=False)
    uri = f"sqlite:///{root}/mlflow.db"
    params_path = demo_ws.params(
        "online", data={"shots": [1], "seeds": [1]}, features={"dir": str(root / "features"), "views": "online"},
        train={"epochs": 2, "eval_every": 0},
        sweep={"space": {"n_ctx": [4]}, "storage": str(root / "ray"), "results_dir": str(root / "res")},
        tracking={"uri": uri, "experiment": "online"},
    )
    assert cli_main(["--params", str(params_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "1 trial(s) would run" in out and "assumption: features.views = online" in out
    from pipeline.sweep.inputs import load_inputs

    shipped = load_inputs(load_params(params_path), [("FashionMNIST", 1, 1)]).features
    images = next(iter(shipped.values())).train_images  # what the trial gets: the images, with an absolute root
    assert images is not None and Path(images.data_root).is_absolute() and len(images.paths) == 10
    outcome = run_sweep(load_params(params_path), SweepOptions(verbose=0))
    assert outcome.counts["finished"] == 1
    _, children = experiment_runs(uri, "online")
    assert children[0].data.params["features.views"] == "online" and children[0].info.status == "FINISHED"
    assert 0.0 <= children[0].data.metrics["test_acc"] <= 100.0
