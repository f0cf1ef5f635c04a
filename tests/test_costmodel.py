"""The cost model: its FLOP counts against torch's FLOP counter on real CoOp steps, and its GPU-hour arithmetic."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from pipeline.costmodel import (
    GPUS,
    PATHS,
    estimate_gpu_hours,
    estimate_trial,
    image_encoder_gflops,
    imagenet_16shot_estimate,
    main,
    packs_tokens,
    prompt_layout,
    step_flops,
    steps_per_epoch,
    tower_shape,
)
from pipeline.engine.backbone import Backbone, count_tokens
from pipeline.engine.prompt import CoOp, PromptConfig, prefers_shared_prefix
from pipeline.engine.reference import official_prompts, official_text_features, official_train_step
from pipeline.params import load_params

REPO = Path(__file__).resolve().parents[1]
NAMES = ["cat", "golden retriever", "sports car", "oak tree", "sail boat", "lighthouse keeper house"]


def counted(fn: object) -> int:
    # The math SDPA backend decomposes attention into matmuls the counter sees (fused kernels have no
    # FLOP formula on the CPU).
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        fn()  # type: ignore[operator]
    return counter.get_total_flops()


@pytest.mark.parametrize("pack", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize(
    ("n_ctx", "csc", "position", "shared"),
    [(16, False, "end", True), (16, False, "middle", True), (8, False, "end", False), (16, True, "end", False),
     (16, True, "middle", False), (4, False, "front", True)],
)
def test_step_flops_match_torchs_count_of_our_step(tiny: Backbone, n_ctx: int, csc: bool, position: str,
                                                   shared: bool, pack: bool) -> None:
    model = CoOp(tiny, NAMES, PromptConfig(n_ctx, "", csc, position), shared_prefix=shared, pack_tokens=pack)
    assert model.pack_tokens == pack  # NAMES differ in length, so there is padding to skip
    features = F.normalize(torch.randn(32, tiny.embed_dim), dim=-1)
    labels = torch.arange(32) % len(NAMES)
    name_tokens = [count_tokens(n) for n in NAMES]
    layout = prompt_layout(n_ctx, max(name_tokens), csc, position, sum(name_tokens) / len(name_tokens))
    assert layout.length == model.prompt_learner.length
    assert layout.real_length * len(NAMES) == pytest.approx(sum(model.prompt_learner.lengths))
    path = "shared" if model.shared_prefix else "truncated"
    if path == "shared":
        assert layout.prefix == model.prompt_learner.shared_len
    assert packs_tokens(len(NAMES), layout, path, "fp32", "cpu") == pack or not pack
    expected = step_flops(tower_shape("coop-tiny"), len(NAMES), layout, path, batch=32, packed=pack)
    assert counted(lambda: F.cross_entropy(model(features), labels).backward()) == pytest.approx(expected.total,
                                                                                               rel=1e-12)


def test_official_text_path_flops_match_torchs_count(tiny: Backbone) -> None:
    ctx = torch.nn.Parameter(0.02 * torch.randn(16, tiny.text_width))
    prompts, eos = official_prompts(tiny, NAMES, ctx, "end")
    shape = tower_shape("coop-tiny")
    expected = step_flops(shape, len(NAMES), prompt_layout(16, 3, False, "end"), "official", batch=32)
    text_only = expected.dense + expected.attention + 2 * 2 * len(NAMES) * shape.width * shape.embed_dim
    assert counted(lambda: official_text_features(tiny, prompts, eos).sum().backward()) == text_only
    # Our paths do strictly less work than the official one on the same prompts.
    for path in ("truncated", "shared"):
        ours = step_flops(shape, len(NAMES), prompt_layout(16, 3, False, "end"), path, batch=32)
        assert ours.total < expected.total


def test_image_encoder_flops_and_the_official_step(tiny: Backbone) -> None:
    # In eval mode nn.MultiheadAttention takes a fused fast path the counter cannot see; train mode runs the
    # same arithmetic (CLIP has no dropout) through countable matmuls.
    model = copy.deepcopy(tiny.model).train()
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model.encode_image(torch.randn(1, 3, tiny.image_size, tiny.image_size))
    assert image_encoder_gflops("coop-tiny") * 1e9 == pytest.approx(counter.get_total_flops())
    assert image_encoder_gflops("RN50") == pytest.approx(12.2, abs=0.1)  # CLIP RN50 at 224 px, counted on meta
    # The official step runs (CPU, fp32 here) and trains its context.
    step, ctx = official_train_step(tiny, NAMES, 16, False, "end", batch=4)
    before = ctx.detach().clone()
    step()
    assert ctx.grad is not None and not torch.equal(before, ctx.detach())


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


def test_imagenet_16shot_estimate_cites_the_published_time() -> None:
    result = imagenet_16shot_estimate("H100")
    paths = result["paths"]
    assert set(paths) == set(PATHS) and result["steps"] == 25000
    assert paths["official"]["tokens_per_prompt"] == 77 and paths["truncated"]["tokens_per_prompt"] < 77
    assert paths["official"]["tflops_per_step"] > 2 * paths["truncated"]["tflops_per_step"]
    assert paths["official"]["hours"] > paths["truncated"]["hours"] > 0
    assert result["published_official_hours"] == pytest.approx(14 + 40 / 60, abs=1e-3)
    assert math.isfinite(result["speedup_vs_official"]) and result["speedup_vs_official"] > 1


def test_cli_prints_the_grid_estimate(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "estimate.json"
    assert main(["--params", str(REPO / "configs" / "paper_vitb16.yaml"), "--gpus", "1", "16", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "990 trials" in printed and "16 GPUs" in printed and "assumption:" in printed
    saved = json.loads(out.read_text())
    assert saved["trials"] == 990 and saved["wall_hours"]["16"] < saved["wall_hours"]["1"]
    assert main(["--params", str(tmp_path / "nope.yaml")]) == 2
