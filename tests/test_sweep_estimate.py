"""GPU-hours of trials and grids: steps per trial, step time on a GPU model, the paper grid, 16-shot ImageNet."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pipeline.engine.backbone import count_tokens
from pipeline.engine.flops import PATHS
from pipeline.engine.prompt import prefers_shared_prefix
from pipeline.params import load_params
from pipeline.sweep.estimate import (
    GPUS,
    estimate_gpu_hours,
    estimate_trial,
    imagenet_16shot_estimate,
    steps_per_epoch,
)

REPO = Path(__file__).resolve().parents[1]


def test_steps_and_step_time_follow_the_recipe_and_the_gpu() -> None:
    assert steps_per_epoch(16 * 1000, 32) == 500  # 16-shot ImageNet
    assert steps_per_epoch(10, 32) == 1 and steps_per_epoch(33, 32) == 1 and steps_per_epoch(64, 32) == 2
    h100 = GPUS["H100"]
    assert h100.step_seconds(1e6, "truncated") == pytest.approx(h100.launch_s["truncated"], rel=1e-3)  # launch-bound
    big = 1e15
    assert h100.step_seconds(big, "official") == pytest.approx(big / (989e12 * h100.utilisation["official"]),
                                                               rel=1e-3)  # compute-bound
    alike = h100.launch_s["truncated"] * 989e12 * h100.utilisation["truncated"]  # compute time == floor
    assert h100.step_seconds(alike, "truncated") == pytest.approx(math.sqrt(2) * h100.launch_s["truncated"])
    assert h100.step_seconds(big, "truncated", "fp32") > h100.step_seconds(big, "truncated", "fp16")
    assert GPUS["V100"].step_seconds(big, "official") > h100.step_seconds(big, "official")


def test_grid_estimate_of_the_paper_profile() -> None:
    params = load_params(REPO / "configs" / "paper_rn50.yaml")
    ours = estimate_gpu_hours(params)
    official = estimate_gpu_hours(params, path="official")
    assert len(ours.trials) == len(official.trials) == 990
    for mine, theirs in zip(ours.trials, official.trials, strict=True):
        assert mine.config == theirs.config and mine.steps == theirs.steps
        # shared_prefix null: the engine's GPU rule decides per trial, and so does the model
        expected = "shared" if prefers_shared_prefix("cuda", mine.config["precision"], mine.n_classes,
                                                     mine.layout.prefix) else "truncated"
        assert mine.path == expected
        assert mine.seconds < theirs.seconds
    imagenet16 = [t for t in ours.trials if t.config["dataset"] == "ImageNet" and t.config["shots"] == 16]
    assert {t.steps for t in imagenet16} == {50 * 500} and {t.n_classes for t in imagenet16} == {1000}
    eurosat1 = next(t for t in ours.trials if t.config["dataset"] == "EuroSAT" and t.config["shots"] == 1)
    assert eurosat1.steps == 50 and eurosat1.n_classes == 10  # 10 images: one (short) batch per epoch
    total = ours.gpu_hours
    assert total == pytest.approx(sum(ours.by_dataset().values()))
    longest = max(t.gpu_hours for t in ours.trials)
    for n in (1, 8, 64):
        assert max(total / n, longest) * (1 - 1e-9) <= ours.wall_hours(n) <= total / n + longest
    assert ours.by_dataset()["ImageNet"] == max(ours.by_dataset().values())
    assert "990 trials" in ours.summary()


def test_estimate_reads_real_class_names_when_prepared(tmp_path: Path) -> None:
    folder = tmp_path / "Toy"
    folder.mkdir()
    names = ["a", "b", "an extraordinarily long and unusual class name here"]
    (folder / "test.json").write_text(json.dumps({"classnames": names}))
    config = {"dataset": "Toy", "shots": 4, "n_ctx": 16, "ctx_init": "", "csc": True, "class_token_position": "end",
              "epochs": 10, "precision": "fp16"}
    trial = estimate_trial(config, "RN50", GPUS["H100"], splits_dir=tmp_path)
    assert trial.n_classes == 3 and trial.layout.length == 1 + 16 + max(count_tokens(n) for n in names) + 2
    with pytest.raises(ValueError, match="no class count"):
        estimate_trial(config, "RN50", GPUS["H100"])


def test_imagenet_16shot_estimate_compares_our_paths_with_the_official_one() -> None:
    result = imagenet_16shot_estimate("H100")
    paths = result["paths"]
    assert set(paths) == set(PATHS) and result["steps"] == 25000
    assert paths["official"]["tokens_per_prompt"] == 77 and paths["truncated"]["tokens_per_prompt"] < 77
    assert paths["official"]["tflops_per_step"] > 2 * paths["truncated"]["tflops_per_step"]
    assert paths["official"]["hours"] > paths["truncated"]["hours"] > 0
    assert math.isfinite(result["speedup_vs_official"]) and result["speedup_vs_official"] > 1


def test_cpu_trials_are_costed_in_core_hours_at_the_measured_rate_on_their_cores() -> None:
    import math

    from pipeline.engine.flops import packs_tokens, prompt_layout, step_flops, tower_shape
    from pipeline.sweep.estimate import DEV_CPU, estimate_sweep

    config = {"dataset": "EuroSAT", "shots": 16, "seed": 1, "n_ctx": 16, "ctx_init": "", "csc": False,
              "class_token_position": "end", "epochs": 10, "precision": "fp32"}
    two = estimate_trial(config, "RN50", DEV_CPU, batch=32, cores=2)
    # The reference, written out: the CPU engine's path (shared prefix for a unified context, packed tokens),
    # its FLOPs at 2 cores' rate, combined with the floor, per step; plus the per-trial overhead.
    layout = prompt_layout(16, 12, False, "end", 2.2)
    flops = step_flops(tower_shape("RN50"), 10, layout, "shared", 32,
                       packed=packs_tokens(10, layout, "shared", "fp32", "cpu")).total
    step = math.hypot(DEV_CPU.step_floor_s, flops / (DEV_CPU.text_gflops_per_core * 1e9 * 2))
    assert two.path == "shared" and two.steps == 10 * (160 // 32)
    assert two.seconds == pytest.approx(two.steps * step + DEV_CPU.trial_overhead_s)
    assert estimate_trial(config, "RN50", GPUS["H100"]).path == "truncated"  # 10 classes: the GPU rule differs
    one = estimate_trial(config, "RN50", DEV_CPU, batch=32, cores=1)
    assert one.seconds > two.seconds  # more cores, more FLOP/s
    assert estimate_trial({**config, "precision": "bf16"}, "RN50", DEV_CPU, cores=2).seconds > 10 * two.seconds

    raw = {"data": {"datasets": ["EuroSAT"], "shots": [16], "seeds": [1, 2], "splits_dir": "/nonexistent"},
           "backbone": {"arch": "RN50"}, "train": {"epochs": 10, "batch_size": 32},
           "sweep": {"space": {"n_ctx": [16]}, "cpus_per_trial": 2, "max_concurrent": 3}}
    from pipeline.params import params_from_dict

    cpu = estimate_sweep(params_from_dict(raw))
    assert cpu.on_cpu and cpu.unit == "CPU core-hours" and cpu.slots == (1, 3)
    assert cpu.hours == pytest.approx(2 * two.seconds * 2 / 3600)  # 2 seeds x 2 cores
    assert cpu.wall_hours(2) == pytest.approx(two.seconds / 3600)
    text = cpu.summary()
    assert text.startswith("cost model: 2 trials, ") and "CPU core-hours (2 core(s) per trial; as the params ask: " in text
    assert "sweep.gpus_per_trial = 0, sweep.cpus_per_trial = 2) at the rate measured on" in text
    assert "3 trials at a time" in text and "GPU" not in text.splitlines()[0]
    forced = estimate_sweep(params_from_dict(raw), gpu="A100")  # a GPU named for a CPU sweep: costed there, said so
    assert not forced.on_cpu and "GPU-hours on A100" in forced.summary()
    assert "the params ask for CPU trials (sweep.gpus_per_trial = 0)" in forced.summary()
    raw["sweep"]["gpus_per_trial"] = 1
    gpu = estimate_sweep(params_from_dict(raw))
    assert gpu.unit == "GPU-hours" and gpu.hours == pytest.approx(estimate_gpu_hours(params_from_dict(raw)).hours)
