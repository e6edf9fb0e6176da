"""The compute dtype: BF16 on GPUs with BF16, FP32 on CPUs (see BENCHMARKS.md for the measurement)."""

from __future__ import annotations

import os

import torch

_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_compute_dtype(device: torch.device | str) -> torch.dtype:
    """BF16 on a CUDA device that supports it, FP32 otherwise (x86 CPUs mostly run BF16 matmul far
    slower than FP32). NF4_QLORA_COMPUTE_DTYPE=float32|bfloat16|float16 overrides. Decided per call."""
    forced = os.environ.get("NF4_QLORA_COMPUTE_DTYPE")
    if forced:
        if forced not in _NAMES:
            raise ValueError(f"NF4_QLORA_COMPUTE_DTYPE must be one of {sorted(_NAMES)}, got {forced!r}")
        return _NAMES[forced]
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32
