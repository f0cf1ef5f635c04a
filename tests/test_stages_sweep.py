"""The sweep command (stages/sweep.py, also `python -m pipeline.sweep`): flags, --dry-run, exit status."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from sweep_helpers import REPO, base_params

from pipeline.params import SEARCHES, load_params
from pipeline.sweep.space import build_space, trial_key
from stages.sweep import build_parser, main, with_flags

WORDS = "a photo of a"


def write_params(folder: Path, name: str, **sections: dict) -> Path:
    """The sweep tests' base params (paths inside `folder`, nothing built there) with `sections` merged in."""
    data = base_params(folder)
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_help_explains_every_flag() -> None:
    text = build_parser().format_help()
    for flag in ("--params", "--log-level", "--search", "--num-samples", "--max-concurrent", "--address", "--resume",
                 "--tracking-uri", "--name", "--asha", "--no-asha", "--dry-run", "--quiet", "--ray-tables"):
        assert flag in text
    assert "optuna" in text and "Ray" in text and "MLflow" in text and "exit status" in text
    parser = build_parser()
    assert parser.parse_args(["--resume"]).resume == "latest"
    assert parser.parse_args(["--resume", "grid-1"]).resume == "grid-1"
    assert parser.parse_args([]).params is None  # cli.run then reads ./params.yaml, else the typed defaults
    assert [parser.parse_args(["--search", name]).search for name in SEARCHES] == list(SEARCHES)
    with pytest.raises(SystemExit):
        parser.parse_args(["--search", "bayes"])


def test_flags_replace_the_params_they_name(tmp_path: Path) -> None:
    params = load_params(write_params(tmp_path, "p", sweep={"search": "random", "num_samples": 3, "asha": True,
                                                            "address": "10.0.0.1:6379", "name": "mine"}))
    parser = build_parser()
    assert with_flags(params, parser.parse_args([])) == params
    changed = with_flags(params, parser.parse_args(["--search", "optuna", "--num-samples", "9", "--max-concurrent",
                                                    "4", "--address", "auto", "--name", "other", "--no-asha"]))
    assert changed.sweep.search == "optuna" and changed.sweep.num_samples == 9 and changed.sweep.max_concurrent == 4
    assert changed.sweep.address == "auto" and changed.sweep.name == "other" and changed.sweep.asha is False
    assert changed.sweep.space == params.sweep.space and changed.train == params.train


def test_dry_run_prints_the_trials_and_their_count(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    space = {"n_ctx": [4, 8], "ctx_init": ["", WORDS], "csc": [False, True]}
    params = write_params(tmp_path, "dry", sweep={"search": "random", "space": space,
                                                  "storage": str(tmp_path / "dry-ray")})
    assert main(["--params", str(params), "--dry-run", "--search", "grid"]) == 0
    out = capsys.readouterr().out
    expected = build_space(load_params(params)).enumerate()
    # 2 shots x 2 seeds x (4 random-init variants + 1 word-init variant)
    assert len(expected) == 2 * 2 * 5
    assert out.startswith(f"grid: {len(expected)} trials:") and f"{len(expected)} trial(s) would run" in out
    for config in expected:
        assert trial_key(config) in out
    # The cost follows the listing, on the resources the params ask for: CPU trials here (gpus_per_trial 0).
    assert "CPU core-hours (1 core(s) per trial; as the params ask: sweep.gpus_per_trial = 0" in out
    assert "GPU-hours" not in out and "H100" not in out
    assert not (tmp_path / "dry-ray").exists()  # a dry run starts nothing
    gpu = write_params(tmp_path, "gpu", sweep={"space": space, "gpus_per_trial": 0.5, "max_concurrent": 4})
    assert main(["--params", str(gpu), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "GPU-hours on H100 (one GPU per trial; sweep.gpus_per_trial = 0.5: trials share a GPU" in out
    assert "4 GPUs" in out and "CPU core-hours" not in out


def test_dry_run_costs_the_bundles_the_sweep_would_form(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # 2 shots x 2 seeds x 2 variants of FashionMNIST's 10 classes, on GPUs: auto bundles every configuration of a
    # shot count (up to 64 members at 10 classes).
    gpu = write_params(tmp_path, "gpu", sweep={"space": {"n_ctx": [4, 8]}, "gpus_per_trial": 1})
    assert main(["--params", str(gpu), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "sweep.bundle_size auto: 8 configurations in 2 trials (2 bundles of 4)" in out
    assert "cost model: 8 configurations in 2 trials (2 bundles of 4), " in out and "NOT MEASURED on a GPU" in out
    assert "without bundles (--bundle-size 1): 8 trials, " in out
    assert main(["--params", str(gpu), "--dry-run", "--bundle-size", "3"]) == 0
    assert "8 configurations in 4 trials (2 bundles of 3)" in capsys.readouterr().out
    cpu = write_params(tmp_path, "cpu", sweep={"space": {"n_ctx": [4, 8]}})
    for lone in ([str(gpu), "--bundle-size", "1"], [str(cpu)]):  # no bundles: size 1, or auto on CPUs
        assert main(["--params", *lone, "--dry-run"]) == 0
        out = capsys.readouterr().out
        assert "cost model: 8 trials, " in out and "bundle_size" not in out and "bundles of" not in out
        assert "without bundles" not in out


def test_dry_run_of_the_params_search(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """What dvc.yaml runs: every choice from the params file."""
    params = write_params(tmp_path, "stage", sweep={"search": "random", "num_samples": 3, "space": {"n_ctx": [4, 8]}})
    assert main(["--params", str(params), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "random: 3 trials" in out and "3 trial(s) would run" in out


def test_errors_name_the_problem_and_exit_2(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bad_key = write_params(tmp_path, "badkey", sweep={"space": {"n_ctxx": [4]}})
    assert main(["--params", str(bad_key), "--dry-run"]) == 2
    assert "sweep.space.n_ctxx" in caplog.text
    caplog.clear()
    nothing = write_params(tmp_path, "nothing", sweep={"space": {"ctx_init": [WORDS]}})
    assert main(["--params", str(nothing), "--search", "optuna", "--dry-run"]) == 2
    assert "nothing to search" in caplog.text
    caplog.clear()
    assert main(["--params", str(write_params(tmp_path, "ok")), "--num-samples", "0", "--search", "random",
                 "--dry-run"]) == 2
    assert "sweep.num_samples must be >= 1, got 0" in caplog.text
    caplog.clear()
    assert main(["--params", str(tmp_path / "missing.yaml"), "--dry-run"]) == 2
    assert "does not exist" in caplog.text


def test_quiet_keeps_warnings_only(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    params = str(write_params(tmp_path, "q"))
    assert main(["--params", params, "--dry-run", "--num-samples", "3"]) == 0
    assert "--num-samples is ignored" in caplog.text  # grid: an INFO message
    caplog.clear()
    assert main(["--params", params, "--dry-run", "--num-samples", "3", "--quiet"]) == 0
    assert "--num-samples is ignored" not in caplog.text


def test_python_m_pipeline_sweep_is_the_same_command(tmp_path: Path) -> None:
    params = write_params(tmp_path, "m", sweep={"space": {"n_ctx": [4, 8]}})
    done = subprocess.run([sys.executable, "-m", "pipeline.sweep", "--params", str(params), "--dry-run"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "grid: 8 trials:" in done.stdout and "8 trial(s) would run" in done.stdout
    bad = subprocess.run([sys.executable, "-m", "pipeline.sweep", "--params", str(tmp_path / "none.yaml")],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "does not exist" in bad.stderr


def test_a_sweep_name_must_be_plain_and_new(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    params = write_params(tmp_path, "named")
    for flag in ("--name", "--resume"):
        for bad in ("../elsewhere", "a b", ".hidden", "x" * 101):
            caplog.clear()
            assert main(["--params", str(params), flag, bad, "--dry-run"]) == 2, (flag, bad)
            assert repr(bad) in caplog.text and "letters, digits" in caplog.text
    assert main(["--params", str(params), "--name", "paper-rn50_v1.2", "--dry-run"]) == 0
    caplog.clear()
    (tmp_path / "ray" / "taken").mkdir(parents=True)  # an earlier sweep's Ray Tune folder (sweep.storage)
    assert main(["--params", str(params), "--name", "taken"]) == 2
    assert "a sweep named 'taken' already exists" in caplog.text and "--resume taken" in caplog.text
    assert not (tmp_path / "mlflow.db").exists()  # refused before tracking, Ray or the features were touched


@pytest.mark.slow
def test_ctrl_c_stops_a_real_sweep_with_one_resume_instruction(demo_ws) -> None:
    """SIGINT to the process group of a running `python -m pipeline.sweep`, as Ctrl-C in a terminal sends it."""
    import os
    import signal
    import time

    from mlflow import MlflowClient
    from sweep_helpers import stop_group, wait_for

    root = demo_ws.root / "sigint"
    uri = f"sqlite:///{root}/mlflow.db"
    params = demo_ws.params(
        "sigint", data={"shots": [1]}, train={"epochs": 300, "eval_every": 0},
        sweep={"space": {"n_ctx": [4, 8]}, "max_concurrent": 1, "storage": str(root / "ray"),
               "results_dir": str(root / "results"), "name": "interrupted"},
        tracking={"uri": uri, "experiment": "sigint"},
    )

    def a_trial_finished() -> bool:
        try:
            client = MlflowClient(uri)
            experiment = client.get_experiment_by_name("sigint")
            runs = client.search_runs([experiment.experiment_id]) if experiment else []
        except Exception:  # the database is still being created
            return False
        return any(r.info.status == "FINISHED" and "mlflow.parentRunId" in r.data.tags for r in runs)

    root.mkdir(parents=True, exist_ok=True)
    with (root / "out.txt").open("w") as out, (root / "err.txt").open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.sweep", "--params", str(params)], cwd=REPO,
                                stdout=out, stderr=err, start_new_session=True)
        try:
            wait_for(lambda: a_trial_finished() or proc.poll() is not None, 240, 1.0, "a finished trial")
            assert proc.poll() is None, (root / "err.txt").read_text()[-3000:]
            os.killpg(proc.pid, signal.SIGINT)
            start = time.monotonic()
            status = proc.wait(120)
        finally:
            stop_group(proc)
    console = (root / "out.txt").read_text() + (root / "err.txt").read_text()
    assert status == 130, console[-3000:]
    assert time.monotonic() - start < 120
    assert "continue it with: python -m pipeline.sweep --resume interrupted" in console
    assert "Tuner.restore" not in console and "Resume experiment with" not in console  # one instruction, ours
    assert "trials done" in console and "not done" in console  # the progress line's last word
