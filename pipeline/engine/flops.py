"""FLOP model of one CoOp training step: text-tower shapes, prompt layouts, layer and step FLOPs.

CoOp trains only the context vectors, so a step is: the frozen text transformer over every class prompt
(forward + backward to the context; no weight gradients), logits against a batch of image features, and
an SGD update of the context. The model counts matrix-multiply FLOPs (2 per multiply-add) the way
``torch.utils.flop_counter`` does, for three ways of running the text path:

* ``official``: the official CoOp code: every prompt padded to the full 77 tokens, plus the frozen image
  encoder's forward pass on the batch's images (no feature cache);
* ``truncated``: our path for class-specific contexts: only ``L = longest EOS + 1`` tokens per prompt;
* ``shared``: our path for unified contexts: the prompt prefix common to all classes (SOS and, for
  ``end``/``middle``, the context words before the class name) runs once, every class runs only its own
  suffix against the prefix's cached keys and values.

pipeline.sweep.estimate turns these FLOPs into GPU-hours.
"""

from __future__ import annotations

import functools
import logging
import warnings
from dataclasses import dataclass

PATHS = ("official", "truncated", "shared")
OFFICIAL_TOKENS = 77


@dataclass(frozen=True)
class TowerShape:
    """What the FLOP count needs to know about a CLIP text tower."""

    width: int
    layers: int
    embed_dim: int
    mlp_ratio: float = 4.0
    context_length: int = OFFICIAL_TOKENS


@functools.cache
def tower_shape(arch: str) -> TowerShape:
    """The text tower of an open_clip architecture (from its model config; no weights are loaded)."""
    import open_clip

    from pipeline.engine.backbone import register_project_models

    register_project_models()
    config = open_clip.get_model_config(arch)
    if config is None:
        raise ValueError(f"unknown open_clip architecture {arch!r}; see open_clip.list_models()")
    text = config["text_cfg"]
    return TowerShape(
        width=int(text["width"]),
        layers=int(text["layers"]),
        embed_dim=int(config["embed_dim"]),
        mlp_ratio=float(text.get("mlp_ratio", 4.0)),
        context_length=int(text.get("context_length", OFFICIAL_TOKENS)),
    )


@functools.cache
def image_encoder_gflops(arch: str) -> float:
    """Forward GFLOPs of the image encoder on one image, counted on the meta device (no weights, no data)."""
    import open_clip
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.engine.backbone import register_project_models

    register_project_models()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger().disabled, was = True, logging.getLogger().disabled  # open_clip's "no weights" line
        try:
            model = open_clip.create_model(arch, pretrained=None, device="meta").eval()  # BatchNorm: eval
        finally:
            logging.getLogger().disabled = was
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.encode_image(torch.empty(1, 3, int(size), int(size), device="meta"))
    return counter.get_total_flops() / 1e9


def layer_flops(queries: int, keys: int, shape: TowerShape) -> tuple[float, float]:
    """(projection + MLP FLOPs, attention FLOPs) of one residual block's forward for one sequence.

    `queries` tokens are computed, attending to `keys` tokens (keys = queries without a cached prefix).
    """
    dense = queries * (_qkv_flops(shape) + _out_mlp_flops(shape))
    attention = 2.0 * 2.0 * queries * keys * shape.width  # q @ k^T and attn @ v over all heads
    return dense, attention


def _qkv_flops(shape: TowerShape) -> float:
    """Per token: the packed q/k/v projection."""
    return 2.0 * 3 * shape.width**2


def _out_mlp_flops(shape: TowerShape) -> float:
    """Per token: the attention output projection and the MLP (up and down)."""
    return 2.0 * (shape.width**2 + 2 * shape.width * shape.mlp_ratio * shape.width)


@dataclass(frozen=True)
class PromptLayout:
    """Tokens one CoOp prompt set runs: `length` per prompt, of which `prefix` are shared by all classes."""

    length: int  # L: positions up to the longest EOS, inclusive
    prefix: int  # P: SOS + context before the class name, identical in every prompt (0: nothing shared)
    mean_length: float | None = None  # mean positions up to each prompt's own EOS; None: all are L long

    @property
    def real_length(self) -> float:
        return float(self.length) if self.mean_length is None else self.mean_length


def prompt_layout(
    n_ctx: int, max_name_tokens: int, csc: bool, position: str, mean_name_tokens: float | None = None
) -> PromptLayout:
    """Our prompt geometry (pipeline.engine.prompt): SOS, n_ctx context, class name, '.', EOS."""
    length = 1 + n_ctx + max_name_tokens + 2
    mean = None if mean_name_tokens is None else 1 + n_ctx + mean_name_tokens + 2
    if csc:
        return PromptLayout(length, 0, mean)
    shared_ctx = {"end": n_ctx, "middle": n_ctx // 2, "front": 0}[position]
    # The engine skips sharing when only SOS would be shared: it saves nothing.
    return PromptLayout(length, 1 + shared_ctx if shared_ctx > 0 else 0, mean)


def packs_tokens(n_classes: int, layout: PromptLayout, path: str, precision: str, device_type: str = "cuda") -> bool:
    """Whether the engine runs only the real tokens (pipeline.engine.text.Packing) on this path."""
    from pipeline.engine.prompt import prefers_packing

    skipped = layout.prefix if path == "shared" else 0
    padded = n_classes * (layout.length - skipped)
    real = round(n_classes * (layout.real_length - skipped))
    return path != "official" and prefers_packing(device_type, precision, padded, real)


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one training step, by part (forward + backward where there is a backward)."""

    dense: float  # qkv / output projections and MLPs of every layer
    attention: float  # q @ k^T and attn @ v of every layer
    image: float  # the official path encodes the batch's images every step; ours reads a cache
    head: float  # final projection of the C EOS states, logits of the batch against the C classes

    @property
    def total(self) -> float:
        return self.dense + self.attention + self.image + self.head


def step_flops(
    shape: TowerShape,
    n_classes: int,
    layout: PromptLayout,
    path: str,
    batch: int = 32,
    image_gflops: float = 0.0,
    packed: bool = False,
) -> StepFlops:
    """FLOPs of one CoOp step on `path` (official | truncated | shared).

    Our paths: projections and MLPs run on `layout.real_length` tokens per prompt when `packed` (else on
    all L positions), attention on the padded grid, and in the last layer the output projection and MLP
    only on each prompt's EOS row. Backward runs only to the inputs (the tower is frozen): a linear layer's
    input gradient costs what its forward did, attention's backward (dQ, dK, dV, dP) twice its forward.
    Elementwise work (layer norms, softmax, GELU) is not counted, as in ``torch.utils.flop_counter``.
    """
    if path not in PATHS:
        raise ValueError(f"path must be one of {', '.join(PATHS)}, got {path!r}")
    if path == "official":
        dense, attention = layer_flops(shape.context_length, shape.context_length, shape)
        dense, attention = shape.layers * n_classes * dense, shape.layers * n_classes * attention
    else:
        p = layout.prefix if path == "shared" else 0
        s = layout.length - p  # padded positions per prompt in the per-class pass
        rows = n_classes * ((layout.real_length if packed else layout.length) - p)
        dense = shape.layers * rows * _qkv_flops(shape) + (
            ((shape.layers - 1) * rows + n_classes) * _out_mlp_flops(shape)
        )
        attention = shape.layers * n_classes * layer_flops(s, p + s, shape)[1]
        if p:
            prefix_dense, prefix_attention = layer_flops(p, p, shape)
            dense += shape.layers * prefix_dense
            attention += shape.layers * prefix_attention
    dense_total, attention_total = 2.0 * dense, 3.0 * attention
    if path == "shared" and layout.prefix > 0:
        # The prefix's output of the last layer is never read, so its MLP, output projection and attention
        # get no backward pass (its keys and values do, through the suffix).
        p = layout.prefix
        dense_total -= p * _out_mlp_flops(shape)
        attention_total -= 2.0 * layer_flops(p, p, shape)[1]
    head = 2.0 * (2.0 * n_classes * shape.width * shape.embed_dim + 2.0 * batch * n_classes * shape.embed_dim)
    image = batch * image_gflops * 1e9 if path == "official" else 0.0
    return StepFlops(dense_total, attention_total, image, head)
