"""Early stopping on the validation loss: the best evaluation so far and how many came after it."""

from __future__ import annotations

import math


class EarlyStopping:
    """Fed each evaluation in order; `stop` once `patience` evaluations in a row did not lower the
    best validation loss (a loss equal to the best is no improvement)."""

    def __init__(self, patience: int) -> None:
        if patience < 1:
            raise ValueError(f"early stopping patience must be >= 1, got {patience}")
        self.patience = patience
        self.best_step: int | None = None
        self.best_loss = math.inf
        self.since_best = 0

    def improved(self, step: int, loss: float) -> bool:
        """Record the evaluation of `step`; True when it is the new best."""
        if loss < self.best_loss:
            self.best_step, self.best_loss, self.since_best = step, loss, 0
            return True
        self.since_best += 1
        return False

    @property
    def stop(self) -> bool:
        return self.since_best >= self.patience
