"""The cost model command: the grid estimate of a params file, the 16-shot ImageNet estimate, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.tools.costmodel import main

REPO = Path(__file__).resolve().parents[1]


def test_cli_prints_the_grid_estimate(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "estimate.json"
    assert main(["--params", str(REPO / "configs" / "paper_vitb16.yaml"), "--gpus", "1", "16", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "990 trials" in printed and "16 GPUs" in printed and "assumption:" in printed
    saved = json.loads(out.read_text())
    assert saved["trials"] == 990 and saved["wall_hours"]["16"] < saved["wall_hours"]["1"]
    assert main(["--params", str(tmp_path / "nope.yaml")]) == 2


def test_cli_prints_the_imagenet_estimate_beside_the_published_time(capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.data.published import load_published

    assert main(["--imagenet", "--gpu", "A100", "--params", str(REPO / "params.yaml")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["gpu"] == "A100" and result["arch"] == "RN50"
    assert result["published_official_hours"] == pytest.approx(14 + 40 / 60, abs=1e-3)
    assert result["published_official_hours"] == load_published()["timing"]["imagenet_16shot_one_gpu_hours"]


def test_cli_costs_a_cpu_sweep_in_core_hours_and_says_so(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "cpu.json"
    profile = str(REPO / "configs" / "fashion-mnist.yaml")  # gpus_per_trial: 0, cpus_per_trial: 1
    assert main(["--params", profile, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "CPU core-hours (1 core(s) per trial; as the params ask: sweep.gpus_per_trial = 0" in printed
    assert "GPU-hours" not in printed and "2 trials at a time" in printed
    saved = json.loads(out.read_text())
    assert saved["unit"] == "CPU core-hours" and saved["cores_per_trial"] == 1 and set(saved["wall_hours"]) == {"1", "2"}
    assert main(["--params", profile, "--gpu", "H100"]) == 0  # asked for: a GPU estimate, which says what the params ask
    assert "GPU-hours on H100 (one GPU per trial; the params ask for CPU trials" in capsys.readouterr().out


def test_cli_costs_a_methods_profile_by_method_and_protocol(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "b2n.json"
    assert main(["--params", str(REPO / "configs" / "paper_b2n_vitb16.yaml"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "99 trials" in printed and "assumption: CoCoOp: a step encodes batch images x classes prompts" in printed
    saved = json.loads(out.read_text())
    assert saved["trials"] == 99 and set(saved["by_method"]) == {"coop base2new", "cocoop base2new", "kgcoop base2new"}
    assert sum(saved["by_method"].values()) == pytest.approx(saved["hours"])
