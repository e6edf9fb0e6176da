"""RoPE inverse frequencies as Llama-family models define them, for both backends."""

from __future__ import annotations

import math

import numpy as np

from .model_config import ModelConfig


def inverse_frequencies(config: ModelConfig) -> np.ndarray:
    """float32 (head_dim // 2,) rotation frequencies theta ** (-2i / head_dim), scaled as
    `config.rope_scaling` says ("linear" or "llama3"; ModelConfig refuses any other kind). Computed in
    float64 and rounded once, so every machine and backend gets the same values."""
    inv = base_frequencies(config.rope_theta, config.resolved_head_dim)
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv = inv / scaling["factor"]
    elif kind == "llama3":
        inv = inv / llama3_factors(inv, scaling)
    return inv.astype(np.float32)


def base_frequencies(theta: float, head_dim: int) -> np.ndarray:
    """float64 (head_dim // 2,) unscaled frequencies theta ** (-2i / head_dim)."""
    return 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)


def llama3_factors(inv: np.ndarray, scaling: dict) -> np.ndarray:
    """float64 per-frequency divisors of Llama 3's RoPE scaling (what llama.cpp stores as rope_freqs):
    `factor` for long wavelengths, 1 for short ones, a smooth blend in the band between."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    smooth = (old_len / wavelen - low) / (high - low)
    mid = 1.0 / ((1.0 - smooth) / factor + smooth)
    return np.where(wavelen < old_len / high, 1.0, np.where(wavelen > old_len / low, factor, mid))
