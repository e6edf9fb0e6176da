"""NF4 ops with per-call dispatch: Triton kernels (CUDA), the CPU GEMV kernel (CPU linears of few
rows, cpu_gemv.py), nf4core's numpy decoder (other CPU ops), or the plain-torch reference (anything
else, or when forced). Every call is checked first (op_checks.py), so
every path refuses the same bad input with the same message. In auto mode a kernel op is used only
after it passed its self-check (self_check.py); one that fails it runs the reference instead."""

from __future__ import annotations

import torch

from . import cpu_gemv, dequant_cache, ops_host, ops_reference, self_check
from .dispatch import auto_mode, use_host, use_triton
from .nf4_weight import NF4Weight
from .op_checks import check_dtype, check_matmul, check_weight

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _impl(t: torch.Tensor, dtype: torch.dtype, op: str):
    if dtype in _TRITON_DTYPES and use_triton(t):
        if auto_mode() and not self_check.trusted(op, dtype, t.device):
            return ops_reference
        from . import ops_triton  # imports no triton until a kernel is launched

        return ops_triton
    if use_host(t):
        return ops_host
    return ops_reference


def dequantize(w: NF4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W in `dtype` and its original shape, bit-exact with nf4core.dequantize on every path."""
    check_weight("dequantize", w)
    check_dtype("dequantize", dtype)
    return _impl(w.packed, dtype, "dequantize").dequantize(w, dtype)


def block_absmax(w: NF4Weight) -> torch.Tensor:
    """float32 (n_blocks,) block scales, bit-exact with NF4Tensor.block_absmax()."""
    check_weight("block_absmax", w)
    return _impl(w.packed, torch.float32, "dequantize").block_absmax(w)


def linear(x: torch.Tensor, w: NF4Weight) -> torch.Tensor:
    """x (..., in) @ W^T -> (..., out) in x's dtype (fused kernel or dequantize-then-matmul)."""
    check_matmul("linear", x, w, w.shape[-1])
    if dequant_cache.gemv_covers(x):
        return cpu_gemv.linear(x, w)
    return _impl(x.reshape(-1, x.shape[-1]), x.dtype, "linear").linear(x, w)


def linear_grad_input(grad_out: torch.Tensor, w: NF4Weight) -> torch.Tensor:
    """dY (..., out) @ W -> (..., in) in dY's dtype."""
    check_matmul("linear_grad_input", grad_out, w, w.shape[0])
    rows = grad_out.reshape(-1, grad_out.shape[-1])
    return _impl(rows, grad_out.dtype, "linear_grad_input").linear_grad_input(grad_out, w)
