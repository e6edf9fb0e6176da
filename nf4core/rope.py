"""RoPE inverse frequencies as Llama-family models define them, for both backends."""

from __future__ import annotations

import math

import numpy as np

from .model_config import ModelConfig


def inverse_frequencies(config: ModelConfig) -> np.ndarray:
    """float32 (head_dim // 2,) rotation frequencies theta ** (-2i / head_dim), scaled as
    `config.rope_scaling` says ("linear" or "llama3"; ModelConfig refuses any other kind). Computed in
    float64 and rounded once, so every machine and backend gets the same values."""
    dim = config.resolved_head_dim
    inv = 1.0 / config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv = inv / scaling["factor"]
    elif kind == "llama3":
        inv = _llama3(inv, scaling)
    return inv.astype(np.float32)


def _llama3(inv: np.ndarray, s: dict) -> np.ndarray:
    """Long wavelengths divided by `factor`, short ones kept, the band between blended smoothly."""
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old_len / low, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return np.where(medium, smoothed, scaled)
