"""Grouped-query self-attention with RoPE through `scaled_dot_product_attention`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kv_cache import KVCache
from .rope import apply_rope


class Attention(nn.Module):
    """q/k/v/o projections (any linear module: NF4Linear, LoRALinear, nn.Linear), GQA, causal."""

    def __init__(
        self,
        q_proj: nn.Module,
        k_proj: nn.Module,
        v_proj: nn.Module,
        o_proj: nn.Module,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        layer_index: int,
    ) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q_proj, k_proj, v_proj, o_proj
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.layer_index = layer_index

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, T, C); `mask` bool (T, S) or (B, 1, T, S) over the cached and new keys (see
        `masks.attention_mask`); None is causal attention, which after cached positions needs
        T == 1."""
        b, t, _ = x.shape  # (B, T, C)
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.update(self.layer_index, k, v)  # (B, H_kv, past + T, D)
        if mask is None and past > 0 and t > 1:
            raise ValueError("a chunk after cached positions needs an attention mask")
        causal = mask is None and t > 1
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=causal,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))
