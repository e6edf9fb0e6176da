"""The compute dtype: BF16 where the hardware multiplies BF16 natively, FP32 elsewhere.

Measured (BENCHMARKS.md, "PyTorch backend (CPU)"): on a Xeon with AMX, BF16 matmul runs ~4-5x faster
than FP32; x86 CPUs without AMX have no fast BF16 matmul, so they compute in FP32.
"""

from __future__ import annotations

import os

import torch

_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with AMX tiles (BF16 matrix units), as torch reports them."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


def default_compute_dtype(device: torch.device | str) -> torch.dtype:
    """BF16 on a CUDA device that supports it and on CPUs with AMX; FP32 otherwise.
    NF4_QLORA_COMPUTE_DTYPE=float32|bfloat16|float16 overrides. Decided per call, never at import."""
    forced = os.environ.get("NF4_QLORA_COMPUTE_DTYPE")
    if forced:
        if forced not in _NAMES:
            raise ValueError(f"NF4_QLORA_COMPUTE_DTYPE must be one of {sorted(_NAMES)}, got {forced!r}")
        return _NAMES[forced]
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return torch.float32
