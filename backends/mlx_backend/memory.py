"""Memory controls for a Mac (and the CPU): a limit on MLX's allocations and a clear "won't fit"."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
from mlx.utils import tree_flatten

from nf4core import ModelConfig
from nf4core.codebooks import DYNAMIC_MAP_SIGNED, NESTED_BLOCKSIZE, NF4_CODE
from nf4core.dtypes import float_dtype
from nf4core.sources.layout import attention_has_bias
from nf4core.tensor import bits_per_weight

from ..engine import LoRASettings
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
        parts = (
            ("base weights", self.base_weights),
            ("adapters + grads", 2 * self.adapters),
            ("optimizer state", self.optimizer_resident),
            ("activations", self.activations),
        )
        return ", ".join(f"{name} {value / GIB:.2f} GiB" for name, value in parts)


def plan_training(
    model: nn.Module,
    batch_size: int,
    seq_len: int,
    checkpointing: bool,
    optimizer_budget: int | None = None,
) -> MemoryPlan:
    """Estimate the memory of training `model` (frozen NF4 base + trainable adapters)."""
    base = sum(m.nf4.nbytes for _, m in model.named_modules() if isinstance(m, NF4Linear))
    trainable = tree_flatten(model.trainable_parameters())
    adapters = sum(a.nbytes for _, a in trainable)
    base += sum(a.nbytes for _, a in tree_flatten(model.parameters())) - adapters
    state = sum(a.size for _, a in trainable) * BYTES_PER_ELEMENT
    if optimizer_budget is not None:
        state = min(state, optimizer_budget)
    config = getattr(model, "config", None)
    activations = 0 if config is None else _activations(config, batch_size, seq_len, checkpointing)
    return MemoryPlan(base, adapters, state, activations)


def _activations(config: ModelConfig, batch_size: int, seq_len: int, checkpointing: bool) -> int:
    """A rough upper estimate in float32: what autodiff keeps per layer, plus the logits."""
    tokens = batch_size * seq_len
    per_layer = tokens * 4 * (10 * config.hidden_size + 3 * config.intermediate_size)
    per_layer += batch_size * config.num_attention_heads * seq_len * seq_len * 4  # scores
    layers = config.num_hidden_layers
    if checkpointing:  # block inputs for every layer, one layer's internals at a time
        kept = tokens * config.hidden_size * 4 * layers + per_layer
    else:
        kept = per_layer * layers
    return kept + tokens * config.vocab_size * 4 * 2  # logits and their gradient


def linear_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """(out, in) of each linear of one decoder layer, by its Hugging Face name."""
    c, d = config, config.resolved_head_dim
    q, kv = c.num_attention_heads * d, c.num_key_value_heads * d
    return {
        "q_proj": (q, c.hidden_size),
        "k_proj": (kv, c.hidden_size),
        "v_proj": (kv, c.hidden_size),
        "o_proj": (c.hidden_size, q),
        "gate_proj": (c.intermediate_size, c.hidden_size),
        "up_proj": (c.intermediate_size, c.hidden_size),
        "down_proj": (c.hidden_size, c.intermediate_size),
    }


def plan_from_config(
    config: ModelConfig,
    lora: LoRASettings,
    batch_size: int,
    seq_len: int,
    checkpointing: bool = False,
    compute_dtype: str = "float32",
    blocksize: int = 64,
    double_quant: bool = True,
    optimizer_budget: int | None = None,
    adapter_dtype: str = "float32",
) -> MemoryPlan:
    """The same estimate as `plan_training`, before loading anything (for a "won't fit" up front)."""
    dense_bytes = np.dtype(float_dtype(compute_dtype)).itemsize
    bits = bits_per_weight(blocksize, NESTED_BLOCKSIZE if double_quant else None)
    shapes = linear_shapes(config)
    layers = config.num_hidden_layers
    tables = NF4_CODE.nbytes + (DYNAMIC_MAP_SIGNED.nbytes if double_quant else 0)  # per weight
    nf4 = sum(math.ceil(o * i * bits / 8) + tables for o, i in shapes.values()) * layers
    dense = config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings else 2)
    dense += config.hidden_size * (2 * layers + 1)
    biased = [n for n in ("q_proj", "k_proj", "v_proj", "o_proj") if attention_has_bias(config, n)]
    if config.mlp_bias:
        biased += ["gate_proj", "up_proj", "down_proj"]
    dense += sum(shapes[n][0] for n in biased) * layers
    n_adapter = sum(lora.r * (o + i) for n, (o, i) in shapes.items() if n in lora.targets)
    n_adapter *= layers
    adapters = n_adapter * np.dtype(float_dtype(adapter_dtype)).itemsize
    state = n_adapter * BYTES_PER_ELEMENT
    if optimizer_budget is not None:
        state = min(state, optimizer_budget)
    return MemoryPlan(
        nf4 + dense * dense_bytes,
        adapters,
        state,
        _activations(config, batch_size, seq_len, checkpointing),
    )


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
