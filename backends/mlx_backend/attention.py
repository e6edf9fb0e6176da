"""Grouped-query attention with rotary embeddings, optional q/k/v bias (Qwen2) and a KV cache."""

from __future__ import annotations

from ._mlx import mx, nn
from .rope import RoPE


class KVCache:
    """Keys and values of one layer, (B, kv_heads, S, head_dim), grown as tokens are generated."""

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None

    @property
    def offset(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def update(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        if self.keys is None:
            self.keys, self.values = keys, values
        else:
            self.keys = mx.concatenate([self.keys, keys], axis=2)
            self.values = mx.concatenate([self.values, values], axis=2)
        return self.keys, self.values

    @staticmethod
    def for_model(n_layers: int) -> list[KVCache]:
        return [KVCache() for _ in range(n_layers)]


def causal_mask(t: int, offset: int, dtype: mx.Dtype, window: int | None = None) -> mx.array | None:
    """Additive (T, offset + T) mask: query i sees keys up to offset + i and, with a sliding
    window, only keys after offset + i - window (transformers' Mistral rule). None where nothing
    is hidden."""
    if window is not None and offset + t <= window:
        window = None
    if t == 1 and window is None:
        return None
    rows = mx.arange(offset, offset + t)[:, None]
    cols = mx.arange(offset + t)[None, :]
    hidden = cols > rows
    if window is not None:
        hidden = hidden | (cols <= rows - window)
    return mx.where(hidden, mx.array(-mx.inf, dtype), mx.array(0, dtype))


def segment_mask(segments: mx.array, dtype: mx.Dtype, window: int | None = None) -> mx.array:
    """Additive (B, 1, T, T) mask for packed rows: query i sees keys j <= i of its own example
    (segment ids 1, 2, ...; 0 is padding, which sees itself only, so no row is all -inf) and, with a
    sliding window, only keys after i - window (positions within an example are row indices)."""
    t = segments.shape[1]
    rows = mx.arange(t)[:, None]
    cols = mx.arange(t)[None, :]
    same = segments[:, :, None] == segments[:, None, :]  # (B, T, T)
    real = (segments != 0)[:, :, None]
    visible = (same & real & (cols <= rows)) | (cols == rows)
    if window is not None and t > window:
        visible = visible & (cols > rows - window)
    return mx.where(visible, mx.array(0, dtype), mx.array(-mx.inf, dtype))[:, None]


class Attention(nn.Module):
    """Linear layers are created dense here; the model swaps in NF4Linear / LoRALinear."""

    def __init__(
        self, hidden: int, n_heads: int, n_kv_heads: int, head_dim: int, bias: bool, rope: RoPE
    ) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.q_proj = nn.Linear(hidden, n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, n_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, n_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * head_dim, hidden, bias=False)
        self._rope = rope

    def __call__(
        self,
        x: mx.array,
        mask: mx.array | None,
        cache: KVCache | None = None,
        positions: mx.array | None = None,
    ) -> mx.array:
        b, t, _ = x.shape  # (B, T, C)
        q = self.q_proj(x).reshape(b, t, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(b, t, self.n_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(b, t, self.n_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        offset = 0 if cache is None else cache.offset
        q, k = self._rope(q, offset, positions), self._rope(k, offset, positions)  # (B, H|KV, T, D)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, KV, S, D)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(b, t, -1))  # (B, T, C)
