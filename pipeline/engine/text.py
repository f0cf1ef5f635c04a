"""The frozen CLIP text transformer, run on prompt embeddings by the two exact fast paths CoOp allows.

Attention is causal and the feature is read at each prompt's EOS token, so:

* tokens after the longest EOS never influence a feature: `forward` runs only L = max EOS + 1
  positions instead of the model's 77 (truncated path);
* tokens before the first class-dependent token (SOS and, for a unified context, the context words
  in front of the class name) have the same hidden states in every prompt: `forward_shared` computes
  them once, as a batch of one, and runs each class's own tokens against their cached keys and values
  layer by layer (shared-prefix path, the same idea as a KV cache); with G prefixes (CoCoOp: one context
  per image), each is shared by its own consecutive block of prompts;
* tokens after a prompt's own EOS are padding: projections and MLPs run on the real tokens only
  (`Packing`), and in the last layer only on each prompt's EOS token, the one row that is read.

All give the plain 77-token result up to float rounding. Weights can be held in bf16/fp16 copies
(`dtype`) so a step pays no per-call casts; layer norms always run in fp32.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.engine.backbone import Backbone


@dataclass(frozen=True)
class Packing:
    """Where the real tokens of B prompts padded to T positions sit in the flat (B * T) grid.

    Prompts differ in length (class names of 1 to 12+ tokens), and a padded batch runs every prompt to
    the longest one. Positions after a prompt's EOS never reach its feature (causal attention), so the
    projections and MLPs, most of a layer's work, run on the N real tokens only; attention, cheap at
    these lengths, scatters them back into the padded grid.
    """

    index: torch.Tensor  # (N,) flat positions b * T + t, t < lengths[b], in order

    @staticmethod
    def build(
        lengths: Sequence[int], tokens: int, device: torch.device, pack: bool
    ) -> tuple[Packing | None, torch.Tensor]:
        """(packing, or None when nothing is padded or `pack` is off; row of each prompt's EOS token)."""
        lengths_t = torch.tensor(list(lengths), dtype=torch.long)
        if not pack or bool((lengths_t == tokens).all()):
            return None, (torch.arange(len(lengths_t)) * tokens + lengths_t - 1).to(device)
        valid = torch.arange(tokens).unsqueeze(0) < lengths_t.unsqueeze(1)  # (B, T)
        index = valid.flatten().nonzero().squeeze(1)
        eos = torch.cumsum(lengths_t, 0) - 1
        return Packing(index.to(device)), eos.to(device)


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
        shape: tuple[int, int],
        packing: Packing | None = None,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
        past_mask: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x (N, D), the tokens of B sequences of T positions (`shape` = (B, T)) -> (N, D), plus this layer's
        keys/values (B, H, T, D/H) for later tokens.

        Without `packing`, N = B * T. With it, x holds only the `packing.index` positions of the (B * T)
        grid; the others (after each sequence's EOS) are zero during attention, which causality hides
        from every real token. With `past` (keys/values of P earlier positions of G sequences, G dividing
        B), every token also attends to those of its group (sequences b * G // B); `past_mask` is then the
        (T, P + T) boolean mask allowing all P and the causal T.
        With `keep` (row indices), only those rows are returned: the attention still reads every token,
        but the output projection and MLP run only where a result is used.
        """
        batch, tokens = shape
        width = x.shape[-1]
        qkv = F.linear(self._norm(self.ln_1, x), self.in_w, self.in_b)
        if packing is not None:
            qkv = qkv.new_zeros(batch * tokens, 3 * width).index_copy(0, packing.index, qkv)
        q, k, v = qkv.view(batch, tokens, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        if past is None:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            past_k, past_v = past
            keys = torch.cat([_per_sequence(past_k, batch), k], dim=2)
            values = torch.cat([_per_sequence(past_v, batch), v], dim=2)
            a = F.scaled_dot_product_attention(q, keys, values, attn_mask=past_mask)
        a = a.transpose(1, 2).reshape(batch * tokens, width)
        if packing is not None:
            a = a.index_select(0, packing.index)
        if keep is not None:
            x, a = x.index_select(0, keep), a.index_select(0, keep)
        x = x + self.ls_1(F.linear(a, self.out_w, self.out_b))
        m = self.act(F.linear(self._norm(self.ln_2, x), self.fc_w, self.fc_b))
        x = x + self.ls_2(F.linear(m, self.proj_w, self.proj_b))
        return x, (k, v)


def _per_sequence(past: torch.Tensor, batch: int) -> torch.Tensor:
    """Keys or values of G prefixes (G, H, P, D/H) -> (batch, H, P, D/H), each repeated for its group of
    batch // G consecutive sequences (a view: the concatenation with the sequences' own copies them once)."""
    groups = past.shape[0]
    return past.unsqueeze(1).expand(groups, batch // groups, *past.shape[1:]).reshape(batch, *past.shape[1:])


class TextTower(nn.Module):
    """Frozen text transformer + final norm + projection over prompt embeddings (pos. emb. included)."""

    def __init__(self, backbone: Backbone, dtype: torch.dtype = torch.float32, pack: bool = True) -> None:
        """`pack`: run only each prompt's real tokens (see `Packing`) instead of all padded positions."""
        super().__init__()
        self.dtype = dtype
        self.pack = pack
        self.layers = nn.ModuleList(_Layer(b, dtype) for b in backbone.model.transformer.resblocks)
        self._project = backbone.project_text
        self._mask_cache: dict[tuple[int, int, str], torch.Tensor] = {}
        self._packing_cache: dict[tuple[tuple[int, ...], int, int, bool, str], tuple[Packing | None, torch.Tensor]] = {}

    def forward(self, x: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
        """Truncated path. x (C, L, D); lengths[c] <= L: prompt c's tokens up to its EOS -> features (C, E), fp32."""
        x, shape, packing, eos = self._flatten(x.to(self.dtype), lengths)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x, _ = layer(x, shape, packing, keep=eos if i == last else None)
        return self._head(x)

    def forward_shared(self, prefix: torch.Tensor, suffix: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
        """Shared-prefix path. prefix (G, P, D): G prefixes (1: common to all prompts), suffix (G * C, S, D)
        the rest, prompts g * C .. g * C + C - 1 continuing prefix g, lengths[i] prompt i's suffix tokens up
        to its EOS -> features (G * C, E), fp32."""
        groups, past_len = prefix.shape[:2]
        if suffix.shape[0] % groups:
            raise ValueError(f"{suffix.shape[0]} prompts do not split into {groups} groups of one prefix each")
        prefix = prefix.to(self.dtype).reshape(groups * past_len, -1)
        suffix, shape, packing, eos = self._flatten(suffix.to(self.dtype), lengths)
        mask = self._prefix_mask(past_len, shape[1], suffix.device)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            prefix, past = layer(prefix, (groups, past_len))
            suffix, _ = layer(suffix, shape, packing, past, mask, keep=eos if i == last else None)
        return self._head(suffix)

    def _head(self, eos_states: torch.Tensor) -> torch.Tensor:
        return self._project(eos_states.float()).float()

    def _flatten(
        self, x: torch.Tensor, lengths: Sequence[int]
    ) -> tuple[torch.Tensor, tuple[int, int], Packing | None, torch.Tensor]:
        """(C, T, D) -> the rows the layers run ((N, D)), (C, T), the packing if any, and each EOS's row."""
        batch, tokens, width = x.shape
        key = (tuple(lengths), batch, tokens, self.pack, str(x.device))
        if key not in self._packing_cache:  # checked once per layout, not every step
            if len(lengths) != batch or not all(0 < n <= tokens for n in lengths):
                raise ValueError(f"lengths must give 1..{tokens} tokens for each of {batch} prompts")
            self._packing_cache[key] = Packing.build(lengths, tokens, x.device, self.pack)
        packing, eos = self._packing_cache[key]
        x = x.reshape(batch * tokens, width)
        if packing is not None:
            x = x.index_select(0, packing.index)
        return x, (batch, tokens), packing, eos

    def _prefix_mask(self, past: int, tokens: int, device: torch.device) -> torch.Tensor:
        key = (past, tokens, str(device))
        if key not in self._mask_cache:
            causal = torch.ones(tokens, tokens, dtype=torch.bool, device=device).tril()
            visible = torch.ones(tokens, past, dtype=torch.bool, device=device)
            self._mask_cache[key] = torch.cat([visible, causal], dim=1)
        return self._mask_cache[key]
