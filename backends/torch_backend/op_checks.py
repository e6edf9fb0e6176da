"""What every NF4 op checks at the dispatch boundary (ops.py), whichever path then runs it: the
Triton kernels index memory by the shapes they are given and would compute a wrong-shaped result
where the reference raises, and the host path reads CPU memory only. Each failure is one ValueError
naming the op and the shapes, dtypes or devices."""

from __future__ import annotations

import torch

from .nf4_weight import NF4Weight

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_weight(op: str, w: NF4Weight) -> None:
    """The NF4 data have their format's dtypes and sizes and live on one device."""
    if not isinstance(w, NF4Weight):
        raise ValueError(f"nf4 {op}: the weight must be an NF4Weight, got {type(w).__name__}")
    if w.packed.dtype != torch.uint8 or w.packed.dim() != 1:
        raise ValueError(
            f"nf4 {op}: packed codes must be 1-D uint8, got {w.packed.dtype} "
            f"{tuple(w.packed.shape)}"
        )
    if w.quant_map.dtype != torch.float32 or w.quant_map.numel() != 16:
        raise ValueError(
            f"nf4 {op}: the code table must be 16 float32 values, got {w.quant_map.dtype} "
            f"{tuple(w.quant_map.shape)}"
        )
    scales = w.absmax if w.absmax is not None else w.nested_codes
    want = torch.float32 if w.absmax is not None else torch.uint8
    if scales is None or scales.dtype != want:
        raise ValueError(
            f"nf4 {op}: block scales must be {want}, got {None if scales is None else scales.dtype}"
        )
    for t in w.tensors():
        if t.device != w.packed.device:
            raise ValueError(
                f"nf4 {op}: the weight's tensors lie on {w.packed.device} and {t.device}"
            )


def check_matmul(op: str, x: torch.Tensor, w: NF4Weight, width: int) -> None:
    """x (..., width) floating, on the weight's device; `width` is the weight dim x multiplies."""
    check_weight(op, w)
    if len(w.shape) != 2:
        raise ValueError(f"nf4 {op}: the weight must be 2-D (out, in), got shape {w.shape}")
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        raise ValueError(f"nf4 {op}: the input must be a tensor of at least 1 dim")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"nf4 {op}: the input must be float32, float16, bfloat16 or float64, got {x.dtype}"
        )
    if x.shape[-1] != width:
        raise ValueError(
            f"nf4 {op}: input {tuple(x.shape)} does not fit weight {tuple(w.shape)} "
            f"(its last dim must be {width})"
        )
    if x.device != w.packed.device:
        raise ValueError(f"nf4 {op}: the input is on {x.device}, the weight on {w.packed.device}")


def check_dtype(op: str, dtype: torch.dtype) -> None:
    if dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"nf4 {op}: the result dtype must be float32, float16, bfloat16 or float64, got {dtype}"
        )
