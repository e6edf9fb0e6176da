"""One QLoRA optimizer step: masked next-token loss over accumulated micro-batches, clipping and
paged AdamW over the trainable (adapter) parameters, at the learning rate the caller gives (the
schedule is the pipeline's, `backends.schedule`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .model.llama import target_mask
from .paged_adamw import PagedAdamW


@dataclass(frozen=True)
class TrainConfig:
    """Optimizer and step settings. `max_grad_norm` <= 0 disables clipping; `paged` None pages the
    optimizer state of CUDA parameters only."""

    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    grad_accum_steps: int = 1
    paged: bool | None = None
    page_bytes: int = 64 << 20

    def __post_init__(self) -> None:
        if self.grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
        object.__setattr__(self, "betas", tuple(self.betas))


@dataclass(frozen=True)
class Batch:
    """input_ids (B, T) int64; loss_mask (B, T) bool marks target tokens (None: all but the first);
    position_ids and segment_ids (B, T) for packed rows (segment 0 is padding), or None."""

    input_ids: torch.Tensor
    loss_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    segment_ids: torch.Tensor | None = None

    @classmethod
    def from_numpy(cls, batch: object, device: torch.device | str = "cpu") -> Batch:
        """From an `nf4core.Batch` (numpy input_ids, loss_mask, position_ids, segment_ids). Rows of
        one example each (right-padded) keep the plain causal path, which is faster; packed rows
        carry positions and segments."""

        def put(a, dtype):
            return torch.from_numpy(np.asarray(a)).to(device=device, dtype=dtype)

        ids, mask = put(batch.input_ids, torch.long), put(batch.loss_mask, torch.bool)
        if np.asarray(batch.segment_ids).max(initial=0) <= 1:
            return cls(ids, mask)
        return cls(
            ids, mask, put(batch.position_ids, torch.long), put(batch.segment_ids, torch.long)
        )

    def n_targets(self) -> int:
        return int(target_mask(self.input_ids, self.loss_mask, self.segment_ids).sum())


@dataclass(frozen=True)
class StepStats:
    loss: float  # mean loss per target token over the step's micro-batches
    learning_rate: float
    grad_norm: float  # before clipping
    tokens: int  # target tokens in the step


class Trainer:
    """Trains the parameters of `model` that require grad (the adapters) with PagedAdamW."""

    def __init__(self, model: nn.Module, config: TrainConfig) -> None:
        self.model, self.config = model, config
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters (apply LoRA first)")
        self.optimizer = PagedAdamW(
            self.params,
            lr=1.0,  # replaced by each step's learning rate
            betas=config.betas,
            eps=config.eps,
            weight_decay=config.weight_decay,
            page_bytes=config.page_bytes,
            paged=config.paged,
        )
        self.step_index = 0
        # data parallel: sums the gradients (in place) and the loss over the ranks; returns the loss
        self.reduce: Callable[[list[torch.Tensor], float], float] | None = None

    def train_step(
        self, micro_batches: Sequence[Batch], lr: float, total: int | None = None
    ) -> StepStats:
        """Accumulate gradients over `micro_batches` (normalised by their total target count, so the
        result equals one big batch), clip, and take one optimizer step at `lr`. A non-finite loss or
        gradient norm skips the update (the stats show it; the caller decides what follows).
        `total`: the target count of the global batch when this rank holds a share of it."""
        if len(micro_batches) != self.config.grad_accum_steps:
            raise ValueError(
                f"expected {self.config.grad_accum_steps} micro-batches, got {len(micro_batches)}"
            )
        self.model.train()
        if total is None:
            total = sum(b.n_targets() for b in micro_batches)
        if total == 0:
            raise ValueError("no target tokens in this step (check the loss masks)")
        loss_sum = 0.0
        for batch in micro_batches:
            summed, _ = self.model.loss(
                batch.input_ids, batch.loss_mask, batch.position_ids, batch.segment_ids
            )
            (summed / total).backward()
            loss_sum += float(summed.detach())
        if self.reduce is not None:
            loss_sum = self.reduce(self.params, loss_sum)
        clip = self.config.max_grad_norm if self.config.max_grad_norm > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, clip))
        if not lr > 0:
            raise ValueError(f"the learning rate must be positive, got {lr}")
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if math.isfinite(loss_sum) and math.isfinite(grad_norm):
            self.optimizer.step()
        else:  # never apply a non-finite update; the step still counts, as a resume would count it
            self.optimizer.count_skipped_step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_index += 1
        return StepStats(loss=loss_sum / total, learning_rate=lr, grad_norm=grad_norm, tokens=total)
