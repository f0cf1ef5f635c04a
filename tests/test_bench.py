"""The step benchmark runs end to end on a small tower and its figures are consistent (speed goals
themselves live in BENCHMARKS.md, not in tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # end to end: stages and tools run as real processes

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


def test_cost_model_benchmark_puts_the_models_flops_beside_measured_steps(tmp_path: Path) -> None:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    from pipeline.engine.backbone import count_tokens
    from pipeline.engine.flops import image_encoder_gflops, prompt_layout, step_flops, tower_shape

    out = tmp_path / "costmodel.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "costmodel.py"), "--arch", "coop-tiny", "--classes", "20", "--device",
         "cpu", "--precision", "fp32", "--repeats", "1", "--out", str(out)],
        check=True, capture_output=True, text=True, timeout=600,
    )
    rows = json.loads(out.read_text())
    assert [json.loads(line) for line in done.stdout.splitlines()] == rows  # JSON lines on stdout, the same rows
    # Unified contexts: the shared prefix, the truncated path and the official step; class-specific: no prefix.
    assert [(r["csc"], r["path"]) for r in rows] == [(False, "shared"), (False, "truncated"), (False, "official"),
                                                     (True, "truncated"), (True, "official")]
    tokens = [count_tokens(n) for n in IMAGENET_CLASSNAMES[:20]]  # the real class list, duplicates and all
    for row in rows:
        layout = prompt_layout(16, max(tokens), row["csc"], "end", sum(tokens) / len(tokens))
        flops = step_flops(tower_shape("coop-tiny"), 20, layout, row["path"], 32, image_encoder_gflops("coop-tiny"),
                           row["packed"])
        assert row["model_tflops_per_step"] == pytest.approx(flops.total / 1e12)
        assert row["achieved_tflops"] == pytest.approx(row["model_tflops_per_step"] / row["seconds_per_step"])
        assert row["tokens"] == (77 if row["path"] == "official" else layout.length)
        assert row["prefix"] == (17 if row["path"] == "shared" else 0) and not row["cuda_graph"]
    assert rows[0]["model_tflops_per_step"] < rows[1]["model_tflops_per_step"] < rows[2]["model_tflops_per_step"]
