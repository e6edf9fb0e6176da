"""Memory controls for a Mac (and the CPU): a limit on MLX's allocations and a clear "won't fit"."""

from __future__ import annotations

import os
from dataclasses import dataclass

from mlx.utils import tree_flatten

from ._mlx import mx, nn
from .nf4_linear import NF4Linear
from .paged_optimizer import BYTES_PER_ELEMENT

GIB = 1 << 30


class ModelWontFitError(MemoryError):
    """The estimated peak memory of a run exceeds the memory available to it."""


@dataclass(frozen=True)
class MemoryPlan:
    """Estimated bytes of a training run (activations are a rough upper estimate)."""

    base_weights: int
    adapters: int
    optimizer_resident: int
    activations: int

    @property
    def total(self) -> int:
        return self.base_weights + 2 * self.adapters + self.optimizer_resident + self.activations

    def describe(self) -> str:
        parts = (("base weights", self.base_weights), ("adapters + grads", 2 * self.adapters),
                 ("optimizer state", self.optimizer_resident), ("activations", self.activations))
        return ", ".join(f"{name} {value / GIB:.2f} GiB" for name, value in parts)  # fmt: skip


def plan_training(model: nn.Module, batch_size: int, seq_len: int, checkpointing: bool,
                  optimizer_budget: int | None = None) -> MemoryPlan:  # fmt: skip
    """Estimate the memory of training `model` (frozen NF4 base + trainable adapters)."""
    base = sum(m.nf4.nbytes for _, m in model.named_modules() if isinstance(m, NF4Linear))
    trainable = tree_flatten(model.trainable_parameters())
    adapters = sum(a.nbytes for _, a in trainable)
    base += sum(a.nbytes for _, a in tree_flatten(model.parameters())) - adapters
    state = sum(a.size for _, a in trainable) * BYTES_PER_ELEMENT
    if optimizer_budget is not None:
        state = min(state, optimizer_budget)
    config = getattr(model, "config", None)
    activations = 0
    if config is not None:
        tokens = batch_size * seq_len
        per_layer = tokens * 4 * (10 * config.hidden_size + 3 * config.intermediate_size)
        per_layer += batch_size * config.num_attention_heads * seq_len * seq_len * 4
        layers = config.num_hidden_layers
        kept = tokens * config.hidden_size * 4 * layers + per_layer if checkpointing else per_layer * layers
        activations = kept + tokens * config.vocab_size * 4 * 2  # logits and their gradient
    return MemoryPlan(base, adapters, state, activations)


def available_memory() -> tuple[int, str]:
    """(bytes, where the number comes from): Metal's recommended working set, else physical RAM."""
    if mx.metal.is_available():
        info = mx.metal.device_info()
        return int(info["max_recommended_working_set_size"]), "Metal recommended working set"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "physical memory"


def check_fits(plan: MemoryPlan, limit_bytes: int | None = None) -> None:
    """Raise ModelWontFitError, with the numbers and what to try, if the plan exceeds the limit."""
    limit, source = (limit_bytes, "memory limit") if limit_bytes else available_memory()
    if plan.total <= limit:
        return
    raise ModelWontFitError(
        f"this run needs about {plan.total / GIB:.2f} GiB ({plan.describe()}), but the {source} is "
        f"{limit / GIB:.2f} GiB. Try a smaller batch size or sequence length, gradient "
        "checkpointing, a smaller LoRA rank, or a paged optimizer budget (spill to disk)."
    )


def set_memory_limit(limit_bytes: int, wired_bytes: int | None = None) -> None:
    """Cap MLX's allocations (mx.set_memory_limit); on Metal also set the wired limit (macOS 15+)."""
    if limit_bytes <= 0:
        raise ValueError(f"memory limit must be positive, got {limit_bytes}")
    mx.set_memory_limit(int(limit_bytes))
    if wired_bytes is not None and mx.metal.is_available():
        mx.set_wired_limit(int(wired_bytes))
