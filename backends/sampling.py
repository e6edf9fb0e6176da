"""How the next token is chosen, for both backends: the settings and the top-p nucleus."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 is greedy; top_p < 1 keeps the smallest set of tokens with that probability."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))


def nucleus(probs: np.ndarray, top_p: float) -> np.ndarray:
    """`probs` (V,) with every token outside the nucleus set to 0 (not renormalised): the most likely
    tokens, in order, until the mass before each reaches `top_p`, so the top token always stays."""
    order = np.argsort(-probs, kind="stable")
    sorted_p = probs[order]
    keep = np.cumsum(sorted_p) - sorted_p < top_p
    out = np.zeros_like(probs)
    out[order[keep]] = sorted_p[keep]
    return out
