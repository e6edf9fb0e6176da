"""Learning-rate schedules (Hugging Face's semantics): constant, linear or cosine after a warmup."""

from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULES = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class ScheduleConfig:
    """lr(step) for optimizer step 0, 1, ...: warmup from 0 over `warmup_steps`, then the decay.

    `total_steps` is required by linear and cosine; they decay to `min_lr_ratio * learning_rate`.
    """

    learning_rate: float = 2e-4
    name: str = "constant"
    warmup_steps: int = 0
    total_steps: int | None = None
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.name!r}; expected one of {SCHEDULES}")
        if not self.learning_rate > 0 or not math.isfinite(self.learning_rate):
            raise ValueError(f"learning_rate must be a positive number, got {self.learning_rate}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.name != "constant" and (
            self.total_steps is None or self.total_steps <= self.warmup_steps
        ):
            raise ValueError(
                f"the {self.name} schedule needs total_steps > warmup_steps "
                f"(got total_steps={self.total_steps}, "
                f"warmup_steps={self.warmup_steps})"
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")

    def __call__(self, step: int) -> float:
        """The learning rate of optimizer step `step` (0-based)."""
        if step < self.warmup_steps:
            return self.learning_rate * step / self.warmup_steps
        if self.name == "constant":
            return self.learning_rate
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        if self.name == "linear":
            factor = 1.0 - progress
        else:
            factor = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.learning_rate * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * factor)
