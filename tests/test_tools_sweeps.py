"""The sweeps list (pipeline/tools/sweeps.py, coop-sweeps): sweeps read back from a real MLflow store."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.sweep.results import TrialRecord
from pipeline.sweep.space import trial_key
from pipeline.sweep.tuner import _parent_metrics
from pipeline.tools.sweeps import best_at_most_shots, list_sweeps, main

REPO = Path(__file__).resolve().parents[1]
BASE = {"n_ctx": 16, "ctx_init": "", "csc": False, "class_token_position": "end", "lr": 0.002, "epochs": 10,
        "precision": "fp32", "seed": 1}


def _records(dataset: str, accuracies: dict[int, tuple[float, float]], failed: int = 0,
             unfinished: int = 0) -> list[TrialRecord]:
    """One finished trial per shots -> (val, test), plus failed and unfinished ones."""
    records = []
    for shots, (val, test) in accuracies.items():
        config = {**BASE, "dataset": dataset, "shots": shots}
        records.append(TrialRecord(config=config, trial_key=trial_key(config), state="FINISHED", val_acc=val,
                                   test_acc=test))
    for index, state in enumerate(["FAILED"] * failed + ["UNFINISHED"] * unfinished):
        config = {**BASE, "dataset": dataset, "shots": 99, "seed": index + 2}
        records.append(TrialRecord(config=config, trial_key=trial_key(config), state=state))
    return records


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A SQLite MLflow store holding three sweeps as the sweep logs them, and a run that is not a sweep."""
    from mlflow import MlflowClient

    from pipeline.tracking import PARENT_TAG, SweepRun

    root = tmp_path_factory.mktemp("sweeps")
    uri = f"sqlite:///{root}/mlflow.db"
    done = SweepRun.start(uri, "demo", "grid-first", params={}, tags={"search": "grid"})
    done.finish("FINISHED", _parent_metrics(
        _records("World.Sketch", {1: (40.0, 38.5), 16: (80.0, 77.25)}, failed=1)
        + _records("Pastel", {2: (50.0, 45.0), 4: (60.0, 58.0)})))
    cut = SweepRun.start(uri, "demo", "cut-short", params={}, tags={"search": "grid"})
    cut.finish("KILLED", _parent_metrics(_records("Pastel", {1: (30.0, 25.0)}, unfinished=3)))
    running = SweepRun.start(uri, "other", "still-going", params={}, tags={"search": "optuna"})
    client = MlflowClient(uri)
    for _ in range(2):
        client.create_run(running.experiment_id, tags={PARENT_TAG: running.run_id, "sweep.name": "still-going"})
    client.create_run(done.experiment_id, run_name="report", tags={"coop.stage": "report"})
    return uri


def test_sweeps_are_listed_with_trials_state_and_best(store: str) -> None:
    sweeps = {s.name: s for s in list_sweeps(store)}
    assert list(sweeps) == ["grid-first", "cut-short", "still-going"]  # oldest first; the report run is no sweep
    first = sweeps["grid-first"]
    assert (first.experiment, first.state) == ("demo", "finished")
    assert first.trials == {"total": 5, "finished": 4, "failed": 1, "stopped": 0, "unfinished": 0}
    assert first.trials_text() == "4/5 finished, 1 failed"
    assert first.best == {"World.Sketch": (16, 77.25), "Pastel": (4, 58.0)}  # the most shots of each dataset
    assert first.best_text() == "Pastel 4-shot 58.0; World.Sketch 16-shot 77.2"
    cut = sweeps["cut-short"]
    assert cut.state == "interrupted" and cut.trials_text() == "1/4 finished, 3 unfinished"
    going = sweeps["still-going"]
    assert (going.experiment, going.state, going.trials_text(), going.best_text()) == \
        ("other", "running", "2 started", "-")
    assert [s.name for s in list_sweeps(store, "other")] == ["still-going"]


def test_best_is_read_from_the_metrics_the_sweep_logs() -> None:
    metrics = _parent_metrics(_records("A.b", {1: (10.0, 11.0), 8: (20.0, 21.0), 2: (30.0, 31.0)}))
    assert best_at_most_shots(metrics) == {"A.b": (8, 21.0)}
    assert best_at_most_shots({"trials_total": 3.0}) == {}
    # Other protocols' settings (sweep/tuner.py::_parent_metrics) are listed apart, by protocol.
    protocols = {"best_test_acc.A.b.16shot.base2new": 60.0, "best_test_acc.A.b.16shot": 70.0,
                 "best_h_acc.A.b.16shot.base2new": 55.0, "best_test_acc.A.b.4shot.xd": 1.0}
    assert best_at_most_shots(protocols) == {"A.b": (16, 70.0), "A.b [base2new]": (16, 60.0), "A.b [xd]": (4, 1.0)}


def test_command_prints_the_table_and_says_what_to_do(store: str, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    params = tmp_path / "p.yaml"
    params.write_text(f"tracking:\n  uri: {store}\n")
    assert main(["--params", str(params)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["sweep", "experiment", "started", "trials"]
    assert [line.split()[0] for line in lines[1:4]] == ["grid-first", "cut-short", "still-going"]
    assert "interrupted" in lines[2] and "--resume NAME" in lines[-1]
    assert main(["--params", str(params), "--experiment", "nope"]) == 2
    assert "no experiment 'nope'" in caplog.text and "demo, other" in caplog.text
    missing = tmp_path / "none.db"
    assert main(["--params", str(params), "--tracking-uri", f"sqlite:///{missing}"]) == 2
    assert "no tracking database" in caplog.text and not missing.exists()  # nothing created on the way


def test_help_is_fast_and_names_the_options() -> None:
    done = subprocess.run([sys.executable, "-m", "pipeline.tools.sweeps", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0
    for flag in ("--params", "--tracking-uri", "--experiment", "--log-level"):
        assert flag in done.stdout
