"""The domain-shift command: --help at once with every flag, and a missing sweep as exit status 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from stages.domain_shift import main

REPO = Path(__file__).resolve().parents[1]


def test_help_lists_every_flag() -> None:
    done = subprocess.run([sys.executable, "-m", "stages.domain_shift", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "DVC stage `domain_shift`" in done.stdout
    for flag in ("--params", "--log-level", "--out", "--shots", "--tracking-uri", "--no-progress",
                 "--device"):
        assert flag in done.stdout


def test_missing_sweep_exits_2_saying_what_to_run(tmp_path: Path, caplog) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"sweep": {"results_dir": str(tmp_path / "sweep")}}))
    assert main(["--params", str(params), "--out", str(tmp_path / "out")]) == 2
    missing = tmp_path / "sweep" / "trials.csv"
    assert f"{missing} is missing; run the sweep first (dvc repro sweep)" in caplog.text
