"""The FLOP model of a CoOp step against torch's FLOP counter on the real steps, every path."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from pipeline.engine.backbone import Backbone, count_tokens
from pipeline.engine.flops import (
    image_encoder_gflops,
    packs_tokens,
    prompt_layout,
    step_flops,
    tower_shape,
)
from pipeline.engine.prompt import PromptConfig
from pipeline.engine.reference import official_train_step
from pipeline.engine.train import TrainConfig, TrainStep, build_model

NAMES = ["cat", "golden retriever", "sports car", "oak tree", "sail boat", "lighthouse keeper house"]
VARIANTS = [(16, False, "end"), (16, False, "middle"), (8, False, "end"), (16, True, "end"), (16, True, "middle"),
            (4, False, "front")]


def counted(fn: object) -> int:
    # The math SDPA backend decomposes attention into matmuls the counter sees (fused kernels have no
    # FLOP formula on the CPU).
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        fn()  # type: ignore[operator]
    return counter.get_total_flops()


def in_train_mode(backbone: Backbone) -> Backbone:
    # In eval mode nn.MultiheadAttention takes a fused fast path the counter cannot see; train mode runs the
    # same arithmetic (CLIP has no dropout) through countable matmuls.
    return dataclasses.replace(backbone, model=copy.deepcopy(backbone.model).train())


@pytest.mark.parametrize("pack", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "truncated"])
@pytest.mark.parametrize(("n_ctx", "csc", "position"), VARIANTS)
def test_step_flops_match_torchs_count_of_our_step(tiny: Backbone, n_ctx: int, csc: bool, position: str,
                                                   shared: bool, pack: bool) -> None:
    cfg = TrainConfig(precision="fp32", shared_prefix=shared, pack_tokens=pack, cuda_graph=False)
    model = build_model(tiny, NAMES, PromptConfig(n_ctx, "", csc, position), cfg)
    assert model.pack_tokens == pack  # NAMES differ in length, so there is padding to skip
    step = TrainStep(model, cfg)
    features = F.normalize(torch.randn(32, tiny.embed_dim), dim=-1)
    labels = torch.arange(32) % len(NAMES)
    name_tokens = [count_tokens(n) for n in NAMES]
    layout = prompt_layout(n_ctx, max(name_tokens), csc, position, sum(name_tokens) / len(name_tokens))
    assert layout.length == model.prompt_learner.length
    assert layout.real_length * len(NAMES) == pytest.approx(sum(model.prompt_learner.lengths))
    path = "shared" if model.shared_prefix else "truncated"
    assert model.shared_prefix == (shared and layout.prefix > 0)  # only SOS to share: the engine does not
    if path == "shared":
        assert layout.prefix == model.prompt_learner.shared_len
    assert packs_tokens(len(NAMES), layout, path, "fp32", "cpu") == pack or not pack
    expected = step_flops(tower_shape("coop-tiny"), len(NAMES), layout, path, batch=32, packed=pack)
    assert counted(lambda: step(features, labels)) == pytest.approx(expected.total, rel=1e-12)


@pytest.mark.parametrize(("n_ctx", "csc", "position"), VARIANTS)
def test_step_flops_match_torchs_count_of_the_official_step(tiny: Backbone, n_ctx: int, csc: bool,
                                                            position: str) -> None:
    """The official step: the batch's 32 images through the image encoder, 77-token prompts, SGD."""
    step, _ = official_train_step(in_train_mode(tiny), NAMES, n_ctx, csc, position, batch=32)
    shape = tower_shape("coop-tiny")
    layout = prompt_layout(n_ctx, max(count_tokens(n) for n in NAMES), csc, position)
    expected = step_flops(shape, len(NAMES), layout, "official", 32, image_encoder_gflops("coop-tiny"))
    assert expected.image == 32 * image_encoder_gflops("coop-tiny") * 1e9
    assert counted(step) == pytest.approx(expected.total, rel=1e-12)
    # Our paths do strictly less work than the official one on the same prompts.
    for path in ("truncated", "shared"):
        assert step_flops(shape, len(NAMES), layout, path, batch=32).total < expected.total


def test_image_encoder_flops_and_the_official_step(tiny: Backbone) -> None:
    model = in_train_mode(tiny).model
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model.encode_image(torch.randn(1, 3, tiny.image_size, tiny.image_size))
    assert image_encoder_gflops("coop-tiny") * 1e9 == pytest.approx(counter.get_total_flops())
    assert image_encoder_gflops("RN50") == pytest.approx(12.2, abs=0.1)  # CLIP RN50 at 224 px, counted on meta
    assert image_encoder_gflops("coop-tiny-rn") > 0  # BatchNorm in eval mode: one image is a valid batch
    # The official step runs (CPU, fp32 here) and trains its context.
    step, ctx = official_train_step(tiny, NAMES, 16, False, "end", batch=4)
    before = ctx.detach().clone()
    step()
    assert ctx.grad is not None and not torch.equal(before, ctx.detach())


def test_tower_shapes_come_from_open_clips_configs() -> None:
    rn50 = tower_shape("RN50")
    assert (rn50.width, rn50.layers, rn50.embed_dim, rn50.context_length) == (512, 12, 1024, 77)
    with pytest.raises(ValueError, match="unknown open_clip architecture 'RN51'"):
        tower_shape("RN51")
    with pytest.raises(ValueError, match="path must be one of official, truncated, shared"):
        step_flops(rn50, 10, prompt_layout(16, 3, False, "end"), "packed")
