"""Interpreting learned contexts: the vocabulary words nearest to each context vector (CoOp, Sec. 4.5)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from pipeline.engine.backbone import Backbone, decode_tokens

NEAREST_BLOCK = 512  # context vectors per distance computation (512 x 49,408 distances: 100 MiB)


@torch.no_grad()
def nearest_words(ctx: torch.Tensor, backbone: Backbone, k: int = 3) -> list[list[tuple[str, float]]]:
    """For each context vector, the k token embeddings closest in Euclidean distance, as (word, distance), the
    word being the token's text (`decode_tokens`: UTF-8, no end-of-word marker), as the report and artifacts show it.

    `ctx` is (M, D) or (C, M, D); the result has M or C*M rows, row-major over (class, position).
    """
    vectors = ctx.reshape(-1, ctx.shape[-1]).float().to(backbone.device)
    table = backbone.model.token_embedding.weight.float()
    rows = []
    # In blocks of rows: a CSC context on ImageNet has 16,000 vectors, and their distances to the 49,408
    # vocabulary embeddings at once would take 3 GiB.
    for block in vectors.split(NEAREST_BLOCK):
        top = torch.cdist(block, table).topk(k, dim=-1, largest=False)
        for ids, dists in zip(top.indices.tolist(), top.values.tolist(), strict=True):
            rows.append(list(zip(decode_tokens(ids), (round(d, 4) for d in dists), strict=True)))
    return rows


def nearest_word_entries(
    ctx: torch.Tensor, backbone: Backbone, classnames: Sequence[str], k: int = 3
) -> list[dict[str, Any]]:
    """`nearest_words` with each vector's owner: {"label", "class", "position" (1-based), "words"}.

    A class-specific context's rows belong to a class, named by its label (index in `classnames`) and its
    name; the label is what identifies it, since two classes may share a name (ImageNet's 'missile').
    A unified context's rows have label and class None.
    """
    csc = ctx.dim() == 3
    if csc and ctx.shape[0] != len(classnames):
        raise ValueError(f"class-specific context has {ctx.shape[0]} classes but {len(classnames)} class names")
    n_ctx = ctx.shape[-2]
    entries = []
    for index, words in enumerate(nearest_words(ctx, backbone, k)):
        label, position = divmod(index, n_ctx)
        entries.append({
            "label": label if csc else None,
            "class": classnames[label] if csc else None,
            "position": position + 1,
            "words": [{"word": w, "distance": d} for w, d in words],
        })
    return entries


def format_entry(entry: dict[str, Any]) -> str:
    """One line of text for an entry of `nearest_word_entries`: "[657 missile] v1: word (0.123), ..."."""
    owner = f"[{entry['label']} {entry['class']}] " if entry["label"] is not None else ""
    words = ", ".join(f"{w['word']} ({w['distance']:.3f})" for w in entry["words"])
    return f"{owner}v{entry['position']}: {words}"
