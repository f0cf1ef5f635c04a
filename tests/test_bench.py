"""The step benchmark runs end to end on a small tower and its figures are consistent (speed goals
themselves live in BENCHMARKS.md, not in tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_step_benchmark_reports_consistent_ratios(tmp_path: Path) -> None:
    out = tmp_path / "step.json"
    subprocess.run(
        [sys.executable, str(REPO / "bench" / "step.py"), "--arch", "coop-tiny", "--classes", "20", "--quick",
         "--scaling", "10", "--feature-images", "0", "--out", str(out)],
        check=True, capture_output=True, text=True, timeout=600,
    )
    result = json.loads(out.read_text())
    # One row per context kind and precision measured (bf16 only on CPUs with native bf16 matrix units).
    precisions = list(dict.fromkeys(r["precision"] for r in result["steps"]))
    assert precisions[0] == "fp32" and set(precisions) <= {"fp32", "bf16"}
    assert [(r["position"], r["csc"], r["precision"]) for r in result["steps"]] == [
        ("end", csc, precision) for csc in (False, True) for precision in precisions
    ]
    for row in result["steps"] + result["scaling"]:
        assert row["ratio"] == pytest.approx(row["official_ms"] / row["ours_ms"])
    # 77 tokens plus the image encoder against a few tokens per class: ours must win even on a tiny tower.
    unified = result["steps"][0]
    assert unified["ratio"] > 1
    assert [text["precision"] for text in result["text_path"]] == precisions
    for text in result["text_path"]:
        assert text["gflops"] == pytest.approx(text["gflop"] / (text["ms"] / 1e3))
        assert 0 < text["of_peak"] <= 1
        assert text["of_peak"] == pytest.approx(text["gflops"] / result["peaks_gflops"][text["precision"]])
