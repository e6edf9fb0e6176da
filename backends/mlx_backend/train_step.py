"""The QLoRA training step on MLX: compiled loss and gradients, loss masking, accumulation, clipping
and paged AdamW with float32 masters, at the learning rate the caller gives (the schedule is the
pipeline's, `backends.schedule`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from mlx.utils import tree_flatten, tree_map

from ._mlx import mx, nn
from .distributed import Summer
from .memory import check_fits, plan_training, set_memory_limit
from .paged_optimizer import PagedAdamW, PagedAdamWConfig


@dataclass(frozen=True)
class TrainConfig:
    """What one optimizer step does; `memory_limit_bytes` caps MLX's allocations and checks fit."""

    optimizer: PagedAdamWConfig = field(default_factory=PagedAdamWConfig)
    grad_accum_steps: int = 1
    max_grad_norm: float | None = 1.0
    seed: int = 0
    compile: bool = True
    gradient_checkpointing: bool = False
    memory_limit_bytes: int | None = None
    batch_size: int = 1  # per micro-batch, for the memory check
    seq_len: int = 512  # for the memory check

    def __post_init__(self) -> None:
        if self.grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive or None, got {self.max_grad_norm}")


@dataclass(frozen=True)
class Batch:
    """Next-token prediction: inputs (B, T) int32, targets (B, T) int32, mask (B, T) float32; packed
    rows also carry positions (B, T) int32 (restarting per example) and segments (B, T) int32 (1, 2,
    ... per example, 0 on padding), else None."""

    inputs: mx.array
    targets: mx.array
    mask: mx.array
    positions: mx.array | None = None
    segments: mx.array | None = None

    @classmethod
    def from_tokens(
        cls,
        tokens: np.ndarray,
        loss_mask: np.ndarray | None = None,
        position_ids: np.ndarray | None = None,
        segment_ids: np.ndarray | None = None,
    ) -> Batch:
        """From (B, T + 1) token ids; `loss_mask` (B, T + 1) marks tokens that are learned (e.g. the
        completion, not the prompt, and not padding). Position t predicts token t + 1. With packed
        rows (`segment_ids` with more than one example in a row), attention and RoPE positions stay
        within each example and no example's first token is predicted from the one before."""
        tokens = np.asarray(tokens, dtype=np.int32)
        mask = np.ones_like(tokens, dtype=np.float32) if loss_mask is None else loss_mask
        mask = np.asarray(mask, dtype=np.float32)[:, 1:]
        if segment_ids is None or np.asarray(segment_ids).max(initial=0) <= 1:
            return cls(mx.array(tokens[:, :-1]), mx.array(tokens[:, 1:]), mx.array(mask))
        segments = np.asarray(segment_ids, dtype=np.int32)
        positions = np.asarray(position_ids, dtype=np.int32)
        same = (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] != 0)
        return cls(
            mx.array(tokens[:, :-1]),
            mx.array(tokens[:, 1:]),
            mx.array(mask * same),
            mx.array(positions[:, :-1]),
            mx.array(segments[:, :-1]),
        )

    def packing(self) -> tuple[mx.array, ...]:
        """(positions, segments) for packed rows, else ()."""
        return () if self.segments is None else (self.positions, self.segments)

    def take_rows(self, rows: slice) -> Batch:
        """The batch of these rows only (a rank's share of a global batch)."""
        fields = (self.inputs, self.targets, self.mask, self.positions, self.segments)
        return Batch(*(None if a is None else a[rows] for a in fields))


def masked_cross_entropy(logits: mx.array, targets: mx.array, mask: mx.array):
    """(sum of token losses where mask is 1, number of such tokens), in float32."""
    losses = nn.losses.cross_entropy(logits.astype(mx.float32), targets, reduction="none")  # (B, T)
    return (losses * mask).sum(), mask.sum()


def clip_by_global_norm(grads: dict, max_norm: float | None):
    """(grads scaled so their global L2 norm is at most max_norm, the norm before clipping)."""
    norm = mx.sqrt(sum(mx.sum(mx.square(g.astype(mx.float32))) for _, g in tree_flatten(grads)))
    if max_norm is None:
        return grads, norm
    scale = mx.minimum(1.0, max_norm / (norm + 1e-6))
    return tree_map(lambda g: (g * scale).astype(g.dtype), grads), norm


class Trainer:
    """Trains the unfrozen parameters of `model` (the LoRA adapters) one optimizer step at a time."""

    def __init__(
        self, model: nn.Module, config: TrainConfig | None = None, summer: Summer | None = None
    ) -> None:
        """`summer`: with data parallel, adds up each rank's share of the loss and gradients."""
        self.model = model
        self.config = config or TrainConfig()
        self.summer = summer
        mx.random.seed(self.config.seed)
        if hasattr(model, "set_gradient_checkpointing"):
            model.set_gradient_checkpointing(self.config.gradient_checkpointing)
        if self.config.memory_limit_bytes is not None:
            plan = plan_training(
                model,
                self.config.batch_size,
                self.config.seq_len,
                self.config.gradient_checkpointing,
                self.config.optimizer.resident_budget_bytes,
            )
            check_fits(plan, self.config.memory_limit_bytes)
            set_memory_limit(self.config.memory_limit_bytes)
        params = model.trainable_parameters()
        if not tree_flatten(params):
            raise ValueError("the model has no trainable parameters (did you apply LoRA?)")
        self.optimizer = PagedAdamW(self.config.optimizer)
        self.optimizer.init(params)

        def loss(inputs, targets, mask, *packing):
            return masked_cross_entropy(model(inputs, None, *packing), targets, mask)

        grad_fn = nn.value_and_grad(model, loss)
        if self.config.compile:
            state = [model.state, mx.random.state]
            grad_fn = mx.compile(grad_fn, inputs=state, outputs=state)
        self._grad_fn = grad_fn

    def gradients(self, micro_batches: list[Batch], total_tokens: int | None = None):
        """(mean-per-token float32 gradients over all micro-batches, mean loss, token count).

        With data parallel, `micro_batches` are this rank's rows of the global ones and
        `total_tokens` counts the global targets: each rank divides its sums by it, and the summer
        adds the ranks' shares up, so every rank gets the one-process result."""
        total_loss, local_tokens, acc = 0.0, 0.0, None
        for batch in micro_batches:
            (loss_sum, count), grads = self._grad_fn(
                batch.inputs, batch.targets, batch.mask, *batch.packing()
            )
            grads = tree_map(lambda g: g.astype(mx.float32), grads)  # accumulate in float32
            acc = grads if acc is None else tree_map(mx.add, acc, grads)
            mx.eval(acc, loss_sum, count)  # one micro-batch's graph at a time
            total_loss += loss_sum.item()
            local_tokens += count.item()
        total_tokens = local_tokens if total_tokens is None else total_tokens
        if total_tokens == 0:
            raise ValueError("no tokens to learn from: every loss-mask entry of the batch is 0")
        grads = tree_map(lambda g: g / total_tokens, acc)
        loss = total_loss / total_tokens
        if self.summer is not None:
            grads, loss = self.summer.all_sum((grads, mx.array(loss, dtype=mx.float32)))
            mx.eval(grads, loss)
            loss = loss.item()
        return grads, loss, int(total_tokens)

    def train_step(
        self, micro_batches: list[Batch], lr: float, total_tokens: int | None = None
    ) -> dict:
        """One optimizer step at `lr` over `grad_accum_steps` micro-batches; returns loss, lr, grad_norm. A
        non-finite loss or gradient norm skips the update (the caller sees it in the result).
        `total_tokens`: see `gradients`."""
        if len(micro_batches) != self.config.grad_accum_steps:
            raise ValueError(
                f"expected {self.config.grad_accum_steps} micro-batches, got {len(micro_batches)}"
            )
        self.model.train()
        grads, loss, tokens = self.gradients(micro_batches, total_tokens)
        grads, norm = clip_by_global_norm(grads, self.config.max_grad_norm)
        if not lr > 0:
            raise ValueError(f"the learning rate must be positive, got {lr}")
        grad_norm = norm.item()
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.model.update(self.optimizer.step(grads, lr))
            mx.eval(self.model.trainable_parameters())
        else:  # never apply a non-finite update; the step still counts, as a resume would count it
            self.optimizer.step_count += 1
        return {"loss": loss, "tokens": tokens, "lr": lr, "grad_norm": grad_norm}
