"""The report command (stages/report.py, console script coop-report): flags, exit codes, MLflow logging, --help."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from report_helpers import check_html

from stages.report import build_parser, main, with_flags

REPO = Path(__file__).resolve().parents[1]


def command_modules() -> list[str]:
    """Every command module: the stages and the tools."""
    stages = sorted(f"stages.{p.stem}" for p in (REPO / "stages").glob("*.py") if p.stem != "__init__")
    tools = sorted(f"pipeline.tools.{p.stem}" for p in (REPO / "pipeline" / "tools").glob("*.py")
                   if not p.stem.startswith("__"))
    return stages + tools


@pytest.mark.parametrize("module", command_modules())
def test_every_flag_has_help(module: str) -> None:
    parser = importlib.import_module(module).build_parser()
    for action in parser._actions:
        assert action.help and action.help.strip(), f"{module}: {action.option_strings} has no help"


def test_help_is_the_stage_doc() -> None:
    done = subprocess.run([sys.executable, "-m", "stages.report", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "DVC stage `report`" in done.stdout
    for flag in ("--params", "--log-level", "--out", "--results-dir", "--baselines-dir", "--tracking-uri",
                 "--no-mlflow"):
        assert flag in done.stdout


def test_folder_flags_override_the_params(report_workspace: dict[str, Any], tmp_path: Path) -> None:
    params = report_workspace["params"]
    args = build_parser().parse_args(["--out", str(tmp_path / "page"), "--results-dir", "r", "--baselines-dir", "b"])
    changed = with_flags(params, args)
    assert (changed.report.dir, changed.sweep.results_dir, changed.report.baselines_dir) == (
        str(tmp_path / "page"), "r", "b")
    assert with_flags(params, build_parser().parse_args([])) == params


def test_bad_params_file_exits_with_2(tmp_path: Path) -> None:
    assert main(["--params", str(tmp_path / "missing.yaml"), "--no-mlflow"]) == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("report: {nonsense: 1}\n")
    assert main(["--params", str(bad), "--no-mlflow"]) == 2


def test_no_mlflow_writes_the_page_only(report_workspace: dict[str, Any], tmp_path: Path) -> None:
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(report_workspace["params"].to_dict()))
    out = tmp_path / "elsewhere"
    assert main(["--params", str(params_file), "--out", str(out), "--no-mlflow"]) == 0
    assert check_html((out / "index.html").read_text()) == []
    assert not Path(report_workspace["params"].report.dir).exists()
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_cli_writes_and_logs_the_page(report_workspace: dict[str, Any], tmp_path: Path) -> None:
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(report_workspace["params"].to_dict()))
    assert main(["--params", str(params_file)]) == 0
    page = Path(report_workspace["params"].report.dir) / "index.html"
    assert page.is_file() and check_html(page.read_text()) == []
    from mlflow import MlflowClient

    client = MlflowClient(report_workspace["params"].tracking.uri)
    experiment = client.get_experiment_by_name("report-test")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.data.tags["coop.stage"] for r in runs] == ["report"]
    assert runs[0].data.metrics == {"finished_trials": 12.0}
    assert runs[0].data.params["trials"] == "13"
    assert [a.path for a in client.list_artifacts(runs[0].info.run_id)] == ["index.html"]
