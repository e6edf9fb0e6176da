"""Rotary position embeddings in Hugging Face's rotate-half layout, with rope scaling variants."""

from __future__ import annotations

import math

import numpy as np

from ._mlx import mx

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def inverse_frequencies(head_dim: int, theta: float, scaling: dict | None) -> np.ndarray:
    """float32 (head_dim // 2,) inverse frequencies, including llama3 / linear rope scaling."""
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))
    inv = inv.astype(np.float32)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind not in SUPPORTED_ROPE_TYPES:
        raise NotImplementedError(
            f"rope_scaling type {kind!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if kind == "linear":
        return (inv / np.float32(scaling["factor"])).astype(np.float32)
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


class RoPE:
    """Applies rotary embeddings to (B, heads, T, head_dim) at positions offset .. offset + T - 1, or
    at per-row `positions` (B, T) (packed rows restart them per example)."""

    def __init__(self, head_dim: int, theta: float, scaling: dict | None = None) -> None:
        self.inv_freq = mx.array(inverse_frequencies(head_dim, theta, scaling))  # (D/2,)

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
