"""Which dtype the frozen weights' big training matmuls use on the CPU at FP32 compute.

The frozen NF4 base linears (x W^T forward, dY W backward) and the frozen LM head are the bulk of a
training step's FLOPs. On CPUs with native BF16 dot products (AVX-512 BF16 or AMX-BF16) those run
2-5x faster with BF16 inputs and FP32 accumulation than in FP32 (BENCHMARKS.md, "Why the CPU compute
dtype is FP32"); elsewhere BF16 is emulated and slower. So in auto mode they take BF16 when the CPU
has it, the matmul has at least `MIN_ROWS` rows and autograd is recording (training); everything
else (activations, norms, the loss, adapters and their optimizer) stays FP32, and dequantize stays
bit-exact: the FP32 weight is only rounded to BF16 as the matmul's input. NF4_CPU_MATMUL=float32
(or `force_cpu_matmul`) keeps them FP32; =bfloat16 asks for BF16 on any CPU.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
from collections.abc import Iterator

import torch

ENV = "NF4_CPU_MATMUL"
CHOICES = ("auto", "bfloat16", "float32")
MIN_ROWS = 64  # fewer rows: converting the weight costs more than BF16 saves (decoding, small M)
_NATIVE_FLAGS = ("avx512_bf16", "amx_bf16")
_forced: list[str] = []


@functools.lru_cache(maxsize=1)
def native_bf16_flags() -> tuple[str, ...]:
    """The CPU flags of native BF16 matmul this machine has (Linux x86 /proc/cpuinfo; else none)."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return ()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return tuple(f for f in _NATIVE_FLAGS if f in flags)
    except OSError:
        pass
    return ()


def requested() -> str:
    """auto | bfloat16 | float32, from `force_cpu_matmul` or NF4_CPU_MATMUL (default auto)."""
    if _forced:
        return _forced[-1]
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise ValueError(f"{ENV}={value!r}: choose one of {', '.join(CHOICES)}")
    return value


def frozen_matmul_dtype(x: torch.Tensor, rows: int) -> torch.dtype:
    """The dtype to multiply FP32 activations `x` (rows of them) with a frozen weight in: x's own
    dtype except for FP32 CPU training matmuls, which take BF16 as described above."""
    if x.dtype != torch.float32 or x.device.type != "cpu":
        return x.dtype
    mode = requested()
    if mode == "float32":
        return torch.float32
    if mode == "bfloat16":
        return torch.bfloat16
    if rows >= MIN_ROWS and torch.is_grad_enabled() and native_bf16_flags():
        return torch.bfloat16
    return torch.float32


def describe() -> str:
    """One line for the run's log: what the frozen matmuls of training use here, and why."""
    mode = requested()
    flags = native_bf16_flags()
    if mode == "float32" or (mode == "auto" and not flags):
        why = "as requested" if mode == "float32" else "this CPU has no native BF16"
        return f"CPU frozen-weight matmuls: FP32 ({why}; {ENV}=bfloat16 overrides)"
    why = "as requested" if mode == "bfloat16" else f"this CPU has {', '.join(flags)}"
    return (
        f"CPU frozen-weight matmuls in training: BF16 inputs, FP32 accumulation ({why}; "
        f"{ENV}=float32 keeps FP32)"
    )


@contextlib.contextmanager
def force_cpu_matmul(mode: str) -> Iterator[None]:
    """Force auto, bfloat16 or float32 inside the block (nests; thread-unsafe by design)."""
    if mode not in CHOICES:
        raise ValueError(f"mode must be one of {CHOICES}, got {mode!r}")
    _forced.append(mode)
    try:
        yield
    finally:
        _forced.pop()
