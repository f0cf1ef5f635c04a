"""`dvc repro` end to end on the bundled demo, in a scratch copy of the project: real DVC, Ray, MLflow."""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow  # end to end: stages and tools run as real processes

ROOT = Path(__file__).resolve().parents[1]


def _dvc(project: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, f"dvc {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def _ran(output: str) -> list[str]:
    return sorted(set(re.findall(r"Running stage '([^']+)'", output)))


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """The demo project with a small grid: one world task and one shifted set, 2 configurations x shots 1, 2 x
    seeds 1, 2, 3 epochs."""
    project = tmp_path_factory.mktemp("demo")
    for name in ("pipeline", "stages"):
        shutil.copytree(ROOT / name, project / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "models", project / "models")  # the frozen pretrain stage's committed outputs
    shutil.copy(ROOT / "dvc.yaml", project / "dvc.yaml")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(datasets=["WorldSketch", "WorldSketchV2"], shots=[1, 2], seeds=[1, 2])
    params["domain_shift"]["targets"] = ["WorldSketchV2"]
    params["train"]["epochs"] = 3
    params["sweep"]["space"] = {"n_ctx": [4], "ctx_init": ["", "a photo of a"], "csc": [False],
                                "class_token_position": ["end"]}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _dvc(project, "init", "--no-scm", "-q")
    plots_config = configparser.ConfigParser()
    plots_config.read(ROOT / ".dvc" / "config")
    for key, value in plots_config["plots"].items():  # html_template: the offline page
        _dvc(project, "config", f"plots.{key}", value)
    shutil.copytree(ROOT / ".dvc" / "plots", project / ".dvc" / "plots")  # the page and the plot template
    return project


def test_repro_runs_every_stage_then_nothing_then_only_what_changed(project):
    first = _dvc(project, "repro")
    assert _ran(first) == ["baselines", "domain_shift", "features@WorldSketch", "features@WorldSketchV2",
                           "prepare@WorldSketch", "prepare@WorldSketchV2", "report", "sweep", "world"]
    trials = (project / "outputs/sweep/trials.csv").read_text().splitlines()
    assert len(trials) == 1 + 2 * 2 * 2  # header + configs x shots x seeds
    assert (project / "outputs/report/index.html").stat().st_size > 0
    shifted = (project / "outputs/baselines/domain_shift.csv").read_text()
    assert ",WorldSketch,WorldSketchV2," in shifted  # the source's contexts were evaluated on its shifted set

    again = _dvc(project, "repro")
    assert _ran(again) == []

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["sweep"]["space"]["n_ctx"] = [2]
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = _dvc(project, "repro")
    assert _ran(changed) == ["domain_shift", "report", "sweep"]  # not prepare, features or baselines


def test_metrics_and_plots_show_the_demo_results(project):
    _dvc(project, "repro")  # a no-op when the test above already ran
    metrics = json.loads(_dvc(project, "metrics", "show", "--json"))
    flat = json.dumps(metrics)
    assert "WorldSketch" in flat and "test_acc" in flat
    rows = [line for line in _dvc(project, "metrics", "show").splitlines() if line.startswith("outputs/sweep/")]
    assert len(rows) == 2  # a row per dataset x shots (WorldSketch at 1 and 2 shots): a table, not one long row
    plots = _dvc(project, "plots", "show", "--json")
    assert "shots" in plots
    _dvc(project, "plots", "show")
    page = (project / "dvc_plots" / "index.html").read_text()
    assert "vegaEmbed(" in page and not re.search(r"""<(script|link)[^>]+(src|href)=["']?(https?:)?//""", page)


def test_every_profile_has_the_params_sections_dvc_reads() -> None:
    """`cp configs/<profile>.yaml params.yaml && dvc repro` (README) needs every section a non-frozen stage
    lists under params: DVC refuses a stage whose section is missing."""
    import yaml

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    needed = {str(p).split(".")[0] for stage in stages.values() if not stage.get("frozen")
              for p in stage.get("params", []) if isinstance(p, str)}
    for profile in sorted((ROOT / "configs").glob("*.yaml")) + [ROOT / "params.yaml"]:
        sections = set(yaml.safe_load(profile.read_text()))
        assert needed <= sections, f"{profile.name} lacks the params sections {sorted(needed - sections)}"
