"""Rotary position embeddings in Hugging Face's rotate-half layout; the frequencies come from
`nf4core.rope.inverse_frequencies`."""

from __future__ import annotations

from nf4core.model_config import ModelConfig
from nf4core.rope import inverse_frequencies

from ._mlx import mx


class RoPE:
    """Applies rotary embeddings to (B, heads, T, head_dim) at positions offset .. offset + T - 1, or
    at per-row `positions` (B, T) (packed rows restart them per example)."""

    def __init__(self, config: ModelConfig) -> None:
        self.inv_freq = mx.array(inverse_frequencies(config))  # (D/2,)

    def __call__(self, x: mx.array, offset: int = 0, positions: mx.array | None = None) -> mx.array:
        t = x.shape[-2]
        if positions is None:
            positions = mx.arange(offset, offset + t, dtype=mx.float32)  # (T,)
        else:
            positions = positions.astype(mx.float32)[:, None, :]  # (B, 1, T): broadcast over heads
        angles = positions[..., None] * self.inv_freq  # (..., T, D/2)
        angles = mx.concatenate([angles, angles], axis=-1)  # (..., T, D)
        cos, sin = mx.cos(angles).astype(x.dtype), mx.sin(angles).astype(x.dtype)
        half = x.shape[-1] // 2
        rotated = mx.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return x * cos + rotated * sin
