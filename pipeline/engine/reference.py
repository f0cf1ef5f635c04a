"""The official CoOp forward pass, transcribed plainly: ground truth for tests and the baseline of benchmarks.

Full 77-token prompts are concatenated piece by piece (per class for middle/front, as in the official
`PromptLearner.forward`) and run through open_clip's own text transformer with its 77x77 causal mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.engine.backbone import Backbone, count_tokens, tokenize


def official_prompts(backbone: Backbone, classnames: list[str], ctx: torch.Tensor, position: str,
                     ctx_init: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """Full prompts (C, 77, D) (no positional embedding) and EOS indices (C,), like CoOp's PromptLearner."""
    names = [n.replace("_", " ") for n in classnames]
    n_cls = len(names)
    n_ctx = ctx.shape[-2]
    placeholder = ctx_init.strip() or " ".join(["X"] * n_ctx)
    tokens = tokenize([placeholder + " " + name + "." for name in names], backbone.context_length)
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
    x = prompts + model.positional_embedding
    x = model.transformer(x, attn_mask=model.attn_mask)
    x = x[torch.arange(x.shape[0], device=x.device), eos]
    return backbone.project_text(x)


def official_logits(backbone: Backbone, classnames: list[str], ctx: torch.Tensor, position: str,
                    image_features: torch.Tensor, ctx_init: str = "") -> torch.Tensor:
    """Logits (B, C) of normalised image features against the official CoOp text features."""
    prompts, eos = official_prompts(backbone, classnames, ctx, position, ctx_init)
    text = F.normalize(official_text_features(backbone, prompts, eos), dim=-1)
    return backbone.logit_scale * F.normalize(image_features, dim=-1) @ text.t()
