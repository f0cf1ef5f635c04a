"""The official CoOp forward pass, transcribed plainly: ground truth for tests and the baseline of benchmarks.

Full 77-token prompts are concatenated piece by piece (per class for middle/front, as in the official
`PromptLearner.forward`) and run through open_clip's own text transformer with its 77x77 causal mask.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from functools import lru_cache

import torch
import torch.nn.functional as F

from pipeline.engine.backbone import Backbone, count_tokens, tokenize


@lru_cache(maxsize=8)
def _tokens(prompts: tuple[str, ...], context_length: int) -> torch.Tensor:
    # The official PromptLearner tokenises once at construction, not every step.
    return tokenize(list(prompts), context_length)


def official_prompts(backbone: Backbone, classnames: list[str], ctx: torch.Tensor, position: str,
                     ctx_init: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """Full prompts (C, 77, D) (no positional embedding) and EOS indices (C,), like CoOp's PromptLearner."""
    names = [n.replace("_", " ") for n in classnames]
    n_cls = len(names)
    n_ctx = ctx.shape[-2]
    placeholder = ctx_init.strip() or " ".join(["X"] * n_ctx)
    tokens = _tokens(tuple(placeholder + " " + name + "." for name in names), backbone.context_length)
    tokens = tokens.to(backbone.device)
    with torch.no_grad():
        embedding = backbone.model.token_embedding(tokens).float()
    prefix = embedding[:, :1, :]
    suffix = embedding[:, 1 + n_ctx :, :]
    if ctx.dim() == 2:
        ctx = ctx.unsqueeze(0).expand(n_cls, -1, -1)
    if position == "end":
        prompts = torch.cat([prefix, ctx, suffix], dim=1)
    elif position == "middle":
        half = n_ctx // 2
        rows = []
        for i, name in enumerate(names):
            n_tok = count_tokens(name)
            rows.append(torch.cat([prefix[i : i + 1], ctx[i : i + 1, :half], suffix[i : i + 1, :n_tok],
                                   ctx[i : i + 1, half:], suffix[i : i + 1, n_tok:]], dim=1))
        prompts = torch.cat(rows, dim=0)
    elif position == "front":
        rows = []
        for i, name in enumerate(names):
            n_tok = count_tokens(name)
            rows.append(torch.cat([prefix[i : i + 1], suffix[i : i + 1, :n_tok], ctx[i : i + 1],
                                   suffix[i : i + 1, n_tok:]], dim=1))
        prompts = torch.cat(rows, dim=0)
    else:
        raise ValueError(position)
    return prompts, tokens.argmax(dim=-1)


def official_text_features(backbone: Backbone, prompts: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    """CoOp's TextEncoder on full prompts: all 77 positions through open_clip's transformer. (C, E)."""
    model = backbone.model
    x = prompts.to(model.positional_embedding.dtype) + model.positional_embedding
    x = model.transformer(x, attn_mask=model.attn_mask)
    x = x[torch.arange(x.shape[0], device=x.device), eos]
    return backbone.project_text(x)


def official_logits(backbone: Backbone, classnames: list[str], ctx: torch.Tensor, position: str,
                    image_features: torch.Tensor, ctx_init: str = "") -> torch.Tensor:
    """Logits (B, C) of normalised image features against the official CoOp text features."""
    prompts, eos = official_prompts(backbone, classnames, ctx, position, ctx_init)
    text = F.normalize(official_text_features(backbone, prompts, eos), dim=-1)
    return backbone.logit_scale * F.normalize(image_features, dim=-1) @ text.t()


def official_train_step(backbone: Backbone, classnames: list[str], n_ctx: int, csc: bool, position: str,
                        batch: int = 32, dtype: torch.dtype = torch.float32
                        ) -> tuple[Callable[[], None], torch.nn.Parameter]:
    """One step of the official CoOp trainer as a closure, and the context it trains (the baseline of
    benchmarks and the cost model).

    The whole CLIP in `dtype` (CoOp's default PREC is fp16 on GPUs), the batch's images through the image
    encoder (CoOp caches nothing), full 77-token prompts through open_clip's transformer, SGD on the context.
    """
    device = backbone.device
    model = backbone.model if dtype == torch.float32 else copy.deepcopy(backbone.model).to(dtype)
    official = dataclasses.replace(backbone, model=model)
    # The official code runs CLIP's image tower as built, in the contiguous layout (ours is channels-last).
    visual = copy.deepcopy(model.visual).to(memory_format=torch.contiguous_format)
    shape = (len(classnames), n_ctx, backbone.text_width) if csc else (n_ctx, backbone.text_width)
    ctx = torch.nn.Parameter(0.02 * torch.randn(shape, device=device, dtype=dtype))
    optimizer = torch.optim.SGD([ctx], lr=0.002, momentum=0.9, weight_decay=5e-4)
    images = torch.randn(batch, 3, backbone.image_size, backbone.image_size, device=device, dtype=dtype)
    labels = torch.randint(len(classnames), (batch,), device=device)

    def step() -> None:
        with torch.no_grad():
            image = F.normalize(visual(images).float(), dim=-1)
        prompts, eos = official_prompts(official, classnames, ctx, position)
        text = F.normalize(official_text_features(official, prompts, eos).float(), dim=-1)
        loss = F.cross_entropy(backbone.logit_scale * image @ text.t(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step, ctx
