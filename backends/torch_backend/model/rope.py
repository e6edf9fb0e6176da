"""Rotary position embeddings as Llama uses them (rotate-half layout); the frequencies come from
`nf4core.rope.inverse_frequencies`."""

from __future__ import annotations

import torch


def rope_cos_sin(
    inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (*positions.shape, head_dim) for integer positions ((T,) or (B, T)), computed in
    float32 then cast."""
    freqs = positions.float()[..., None] * inv_freq.to(positions.device)  # (..., T, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (..., T, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D) rotated by position: x * cos + rotate_half(x) * sin; cos/sin (T, D) or
    (B, T, D)."""
    if cos.dim() == 3:  # per-row positions: broadcast over heads
        cos, sin = cos[:, None], sin[:, None]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
