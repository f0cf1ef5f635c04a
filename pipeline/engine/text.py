"""The frozen CLIP text transformer, run on prompt embeddings by the two exact fast paths CoOp allows.

Attention is causal and the feature is read at each prompt's EOS token, so:

* tokens after the longest EOS never influence a feature: `forward` runs only L = max EOS + 1
  positions instead of the model's 77 (truncated path);
* tokens before the first class-dependent token (SOS and, for a unified context, the context words
  in front of the class name) have the same hidden states in every prompt: `forward_shared` computes
  them once, as a batch of one, and runs each class's own tokens against their cached keys and values
  layer by layer (shared-prefix path, the same idea as a KV cache).

Both give the plain 77-token result up to float rounding. Weights can be held in bf16/fp16 copies
(`dtype`) so a step pays no per-call casts; layer norms always run in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.engine.backbone import Backbone


class _Layer(nn.Module):
    """One residual attention block's frozen weights, laid out for our attention with a KV prefix."""

    def __init__(self, block: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        attn = block.attn
        if not isinstance(attn, nn.MultiheadAttention) or not attn._qkv_same_embed_dim:
            raise ValueError("the text tower's blocks must use nn.MultiheadAttention with packed q/k/v")
        self.heads = attn.num_heads
        self.ln_1, self.ln_2 = block.ln_1, block.ln_2  # kept fp32
        self.ls_1, self.ls_2 = block.ls_1, block.ls_2
        self.act = block.mlp.gelu

        def frozen(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.detach().to(dtype)

        self.register_buffer("in_w", frozen(attn.in_proj_weight), persistent=False)
        self.register_buffer("in_b", frozen(attn.in_proj_bias), persistent=False)
        self.register_buffer("out_w", frozen(attn.out_proj.weight), persistent=False)
        self.register_buffer("out_b", frozen(attn.out_proj.bias), persistent=False)
        self.register_buffer("fc_w", frozen(block.mlp.c_fc.weight), persistent=False)
        self.register_buffer("fc_b", frozen(block.mlp.c_fc.bias), persistent=False)
        self.register_buffer("proj_w", frozen(block.mlp.c_proj.weight), persistent=False)
        self.register_buffer("proj_b", frozen(block.mlp.c_proj.bias), persistent=False)

    @staticmethod
    def _norm(ln: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), ln.normalized_shape, ln.weight, ln.bias, ln.eps).to(x.dtype)

    def forward(
        self,
        x: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
        past_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x (B, T, D) -> (B, T, D), plus this layer's keys/values (B, H, T, D/H) for later tokens.

        With `past` (keys/values of P earlier positions, batch 1), every token also attends to them;
        `past_mask` is then the (T, P + T) boolean mask allowing all P and the causal T.
        """
        batch, tokens, width = x.shape
        h = self._norm(self.ln_1, x)
        qkv = F.linear(h, self.in_w, self.in_b).view(batch, tokens, 3, self.heads, width // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, T, D/H)
        if past is None:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            past_k, past_v = past
            keys = torch.cat([past_k.expand(batch, -1, -1, -1), k], dim=2)
            values = torch.cat([past_v.expand(batch, -1, -1, -1), v], dim=2)
            a = F.scaled_dot_product_attention(q, keys, values, attn_mask=past_mask)
        a = a.transpose(1, 2).reshape(batch, tokens, width)
        x = x + self.ls_1(F.linear(a, self.out_w, self.out_b))
        m = self.act(F.linear(self._norm(self.ln_2, x), self.fc_w, self.fc_b))
        x = x + self.ls_2(F.linear(m, self.proj_w, self.proj_b))
        return x, (k, v)


class TextTower(nn.Module):
    """Frozen text transformer + final norm + projection over prompt embeddings (pos. emb. included)."""

    def __init__(self, backbone: Backbone, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.dtype = dtype
        self.layers = nn.ModuleList(_Layer(b, dtype) for b in backbone.model.transformer.resblocks)
        self._project = backbone.project_text
        self._mask_cache: dict[tuple[int, int, str], torch.Tensor] = {}

    def forward(self, x: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
        """Truncated path. x (C, L, D) with L > max(eos); eos (C,) -> features (C, E), fp32."""
        x = x.to(self.dtype)
        for layer in self.layers:
            x, _ = layer(x)
        return self._head(x[torch.arange(x.shape[0], device=x.device), eos])

    def forward_shared(self, prefix: torch.Tensor, suffix: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
        """Shared-prefix path. prefix (1, P, D) common to all prompts, suffix (C, S, D) the rest,
        eos (C,) EOS index within the suffix -> features (C, E), fp32."""
        prefix, suffix = prefix.to(self.dtype), suffix.to(self.dtype)
        mask = self._prefix_mask(prefix.shape[1], suffix.shape[1], suffix.device)
        for layer in self.layers:
            prefix, past = layer(prefix)
            suffix, _ = layer(suffix, past, mask)
        return self._head(suffix[torch.arange(suffix.shape[0], device=suffix.device), eos])

    def _head(self, eos_states: torch.Tensor) -> torch.Tensor:
        return self._project(eos_states.float()).float()

    def _prefix_mask(self, past: int, tokens: int, device: torch.device) -> torch.Tensor:
        key = (past, tokens, str(device))
        if key not in self._mask_cache:
            causal = torch.ones(tokens, tokens, dtype=torch.bool, device=device).tril()
            visible = torch.ones(tokens, past, dtype=torch.bool, device=device)
            self._mask_cache[key] = torch.cat([visible, causal], dim=1)
        return self._mask_cache[key]
