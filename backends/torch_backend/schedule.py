"""Learning-rate schedules: linear warmup, then cosine, linear or constant."""

from __future__ import annotations

import math
from dataclasses import dataclass

KINDS = ("cosine", "linear", "constant")


@dataclass(frozen=True)
class ScheduleConfig:
    """`warmup_steps` optimizer steps rise linearly to the peak; the rest decay to
    `min_lr_ratio` * peak by `total_steps` (cosine or linear), or stay at the peak (constant)."""

    kind: str = "cosine"
    warmup_steps: int = 0
    total_steps: int = 1000
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"schedule kind must be one of {KINDS}, got {self.kind!r}")
        if self.total_steps <= 0 or self.warmup_steps < 0:
            raise ValueError("total_steps must be positive and warmup_steps >= 0")
        if self.warmup_steps > self.total_steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) exceed total_steps ({self.total_steps})"
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")

    def factor(self, step: int) -> float:
        """Multiplier of the peak learning rate for optimizer step `step` (0-based)."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        progress = min(
            1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        )
        if self.kind == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            shape = 1.0 - progress
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * shape
