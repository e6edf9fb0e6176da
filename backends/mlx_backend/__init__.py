"""The MLX backend: NF4 QLoRA on Apple silicon (Metal kernels) and on any CPU (plain-mlx reference).

Importing this package never imports mlx; the public names below load their module on first use, so
`import backends.mlx_backend` works on a machine without mlx and `is_available()` says whether it is
usable. Nothing here probes a device at import time.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "NF4Weight": "nf4_weight",
    "NF4Linear": "nf4_linear",
    "LoRALinear": "lora",
    "apply_lora": "lora",
    "lora_state_dict": "lora",
    "CausalLM": "model",
    "SamplingConfig": "generate",
    "generate": "generate",
    "generate_tokens": "generate",
    "KVCache": "attention",
    "TrainConfig": "train_step",
    "Trainer": "train_step",
    "masked_cross_entropy": "train_step",
    "PagedAdamW": "paged_optimizer",
    "PagedAdamWConfig": "paged_optimizer",
    "MemoryPlan": "memory",
    "ModelWontFitError": "memory",
    "check_fits": "memory",
    "plan_from_config": "memory",
    "plan_training": "memory",
    "set_memory_limit": "memory",
}

__all__ = ["is_available", *list(_EXPORTS)]  # noqa: PLE0604


def is_available() -> bool:
    """True when mlx can be imported (the CPU path then always works). Imports mlx, probes nothing."""
    try:
        importlib.import_module("mlx.core")
    except ImportError:
        return False
    return True


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
