"""Launchers of the Triton kernels in `cuda/` for `NF4Weight` (same signatures as ops_reference).

Importing this module imports neither triton nor the kernels; the first call does.
"""

from __future__ import annotations

import os

import torch

from .kernels import load_kernel_module
from .nf4_weight import NF4Weight

GEMV_MAX_ROWS = 8  # at most this many rows take the GEMV kernel in the forward
# Compiler options of the double-quant absmax kernel on GPUs: multiply and add stay two roundings
# (tests/backends/torch_backend/test_triton_aot.py checks the PTX has no fma).
ABSMAX_COMPILE_OPTIONS = {"enable_fp_fusion": False}
_ELEMENTS_PER_PROGRAM = 1024


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def block_absmax(w: NF4Weight) -> torch.Tensor:
    """float32 (n_blocks,); multiply and add rounded separately (no FMA), bit-exact with nf4core."""
    if w.absmax is not None:
        return w.absmax
    kernels = load_kernel_module("nf4_kernels.py")
    out = torch.empty(w.n_blocks, dtype=torch.float32, device=w.device)
    extra = {} if _interpreting() else ABSMAX_COMPILE_OPTIONS
    grid = (_cdiv(w.n_blocks, _ELEMENTS_PER_PROGRAM),)
    kernels.nf4_absmax_kernel[grid](w.nested_codes, w.nested_scales, w.nested_quant_map,
                                    w.nested_offset, out, w.n_blocks,
                                    NESTED_BLOCKSIZE=w.nested_blocksize, BLOCK=_ELEMENTS_PER_PROGRAM,
                                    **extra)  # fmt: skip
    return out


def dequantize(w: NF4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    kernels = load_kernel_module("nf4_kernels.py")
    absmax = block_absmax(w)
    out = torch.empty(w.numel, dtype=dtype, device=w.device)
    grid = (_cdiv(w.numel, _ELEMENTS_PER_PROGRAM),)
    kernels.nf4_dequant_kernel[grid](w.packed, absmax, w.quant_map, out, w.numel,
                                     BLOCKSIZE=w.blocksize, BLOCK=_ELEMENTS_PER_PROGRAM)  # fmt: skip
    return out.reshape(w.shape)


def _tiles(m: int) -> dict:
    if _interpreting():
        return {"BM": 16, "BN": 16, "BR": 16}
    return {"BM": 16 if m <= 16 else 64, "BN": 64, "BR": 64}


def _matmul(a: torch.Tensor, w: NF4Weight, transposed: bool) -> torch.Tensor:
    """(M, R) @ W^T (transposed) or @ W; W's shape (N, R) or (R, N)."""
    kernels = load_kernel_module("nf4_kernels.py")
    out_rows, in_cols = w.shape
    n = out_rows if transposed else in_cols
    m, r = a.shape
    c = torch.empty(m, n, dtype=a.dtype, device=a.device)
    if m == 0:
        return c
    t = _tiles(m)
    grid = (_cdiv(m, t["BM"]), _cdiv(n, t["BN"]))
    kernels.nf4_matmul_kernel[grid](a, w.packed, block_absmax(w), w.quant_map, c, m, n, r,
                                    a.stride(0), a.stride(1), c.stride(0), c.stride(1), in_cols,
                                    BLOCKSIZE=w.blocksize, W_TRANSPOSED=transposed,
                                    DOT_FP32=_interpreting() and a.dtype == torch.bfloat16,
                                    PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
                                    **t)  # fmt: skip
    return c


def gemv(x2d: torch.Tensor, w: NF4Weight) -> torch.Tensor:
    """x (M, K) @ W^T for small M with the GEMV kernel -> (M, N)."""
    kernels = load_kernel_module("nf4_kernels.py")
    n, k = w.shape
    m = x2d.shape[0]
    x2d = x2d if x2d.stride(1) == 1 else x2d.contiguous()
    y = torch.empty(m, n, dtype=x2d.dtype, device=x2d.device)
    if m == 0:
        return y
    bn, bk = (16, 32) if _interpreting() else (32, 256)
    kernels.nf4_gemv_kernel[(_cdiv(n, bn), m)](x2d, w.packed, block_absmax(w), w.quant_map, y, n, k,
                                               x2d.stride(0), y.stride(0),
                                               BLOCKSIZE=w.blocksize, BN=bn, BK=bk)  # fmt: skip
    return y


def linear(x: torch.Tensor, w: NF4Weight) -> torch.Tensor:
    """x (..., in) @ W^T -> (..., out)."""
    x2d = x.reshape(-1, x.shape[-1])
    if x2d.shape[0] <= GEMV_MAX_ROWS:
        y = gemv(x2d, w)
    else:
        y = _matmul(x2d, w, transposed=True)
    return y.reshape(*x.shape[:-1], w.shape[0])


def linear_grad_input(grad_out: torch.Tensor, w: NF4Weight) -> torch.Tensor:
    """dY (..., out) @ W -> (..., in)."""
    g2d = grad_out.reshape(-1, grad_out.shape[-1])
    return _matmul(g2d, w, transposed=False).reshape(*grad_out.shape[:-1], w.shape[1])
