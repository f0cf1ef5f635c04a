"""The baselines command: --help at once with every flag, and bad input as exit status 2 with the reason."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from stages.baselines import main

REPO = Path(__file__).resolve().parents[1]


def test_help_lists_every_flag() -> None:
    done = subprocess.run([sys.executable, "-m", "stages.baselines", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "DVC stage `baselines`" in done.stdout
    for flag in ("--params", "--log-level", "--out", "--methods", "--probe-views", "--tracking-uri",
                 "--no-progress", "--device"):
        assert flag in done.stdout


def test_unknown_method_exits_2_naming_the_choices(tmp_path: Path, caplog) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"report": {"baselines_dir": str(tmp_path / "out")}}))
    assert main(["--params", str(params), "--methods", "zero-shot", "few-shot"]) == 2
    choices = "zero-shot, zero-shot-ensemble, linear-probe"
    assert f"unknown baseline method(s) ['few-shot']; choose from {choices}" in caplog.text
    assert not (tmp_path / "out").exists()
