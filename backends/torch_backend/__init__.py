"""The PyTorch backend: NF4 weights, QLoRA layers, the Llama-family model and training.

CUDA tensors use the Triton kernels in `cuda/` when triton is importable; everything else (and any
tensor when forced) takes the plain-torch reference path. The choice is made per call (see dispatch).
Importing this package imports torch, never triton.
"""

from .dispatch import force_path
from .generate import SamplingConfig, generate, generate_tokens
from .kv_cache import KVCache
from .lora import (
    LoRALinear,
    apply_lora,
    load_lora_state_dict,
    lora_state_dict,
)
from .model import CausalLM, causal_lm_loss
from .nf4_linear import NF4Linear, nf4_linear
from .nf4_weight import NF4Weight
from .paged_adamw import PagedAdamW
from .train_step import Batch, StepStats, TrainConfig, Trainer

__all__ = [
    "Batch",
    "CausalLM",
    "KVCache",
    "LoRALinear",
    "NF4Linear",
    "NF4Weight",
    "PagedAdamW",
    "SamplingConfig",
    "StepStats",
    "TrainConfig",
    "Trainer",
    "apply_lora",
    "causal_lm_loss",
    "force_path",
    "generate",
    "generate_tokens",
    "load_lora_state_dict",
    "lora_state_dict",
    "nf4_linear",
]
