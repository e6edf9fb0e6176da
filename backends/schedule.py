"""The learning-rate schedule of every run on every backend: linear warmup, then cosine, linear or
constant. The pipeline computes each step's LR here and hands it to the backend's optimizer step, so a
resumed run, or one continued on the other backend, follows the same curve."""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "linear", "constant")


def learning_rate_at(
    step: int, peak: float, warmup_steps: int, total_steps: int, kind: str
) -> float:
    """The LR of optimizer step `step` (0-based): warmup from peak / warmup_steps (step 0) up to `peak`
    at step warmup_steps - 1, then a cosine or linear decay towards 0 by `total_steps` (floored at
    peak * 1e-6, never exactly 0), or the peak throughout (constant)."""
    if kind not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if kind == "constant":
        return peak
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1 - progress
    return max(peak * shape, peak * 1e-6)
