"""Interpreting learned contexts: the vocabulary words nearest to each context vector (CoOp, Sec. 4.5)."""

from __future__ import annotations

import torch

from pipeline.engine.backbone import Backbone, decode_tokens


@torch.no_grad()
def nearest_words(ctx: torch.Tensor, backbone: Backbone, k: int = 3) -> list[list[tuple[str, float]]]:
    """For each context vector, the k token embeddings closest in Euclidean distance, as (word, distance).

    `ctx` is (M, D) or (C, M, D); the result has M or C*M rows, row-major over (class, position).
    """
    vectors = ctx.reshape(-1, ctx.shape[-1]).float().to(backbone.device)
    table = backbone.model.token_embedding.weight.float()
    distances = torch.cdist(vectors, table)  # (rows, vocab)
    top = distances.topk(k, dim=-1, largest=False)
    rows = []
    for ids, dists in zip(top.indices.tolist(), top.values.tolist(), strict=True):
        rows.append(list(zip(decode_tokens(ids), (round(d, 4) for d in dists), strict=True)))
    return rows
