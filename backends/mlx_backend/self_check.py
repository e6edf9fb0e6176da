"""The Metal kernels' self-checks (see backends/kernel_self_check.py): each op family on a tiny
weight against ops_reference. Dequantize (and the block scales) must match bit for bit; the
matmuls within the dtype's tolerance, on every route ops_metal takes (the GEMV kernel, the fused
kernel, and the dequantize kernel followed by MLX's matmul)."""

from __future__ import annotations

import functools

import numpy as np

import nf4core
from backends import kernel_self_check

from . import ops_reference
from ._mlx import mx
from .nf4_weight import NF4Weight

OPS = ("dequantize", "linear", "linear_grad_input")
_OUT, _IN = 20, 70  # 22 blocks of 64, the last one partial
_ROUTES = ((3, "fused"), (9, "fused"), (9, "dequant"))  # (rows, strategy): GEMV, fused, dequant


@functools.cache
def _nf4() -> nf4core.NF4Tensor:
    w = np.random.default_rng(11).standard_normal((_OUT, _IN)).astype(np.float32)
    return nf4core.quantize(w, blocksize=64, double_quant=True)


def _host(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32))


def _pairs(kernels, op: str, dtype: mx.Dtype) -> kernel_self_check.Pairs:
    w = NF4Weight.from_nf4(_nf4())
    if op == "dequantize":
        return [
            (_host(kernels.reconstruct_absmax(w)), _host(ops_reference.reconstruct_absmax(w))),
            (_host(kernels.dequantize(w, dtype)), _host(ops_reference.dequantize(w, dtype))),
        ]
    rng = np.random.default_rng(5)
    width = _IN if op == "linear" else _OUT
    pairs = []
    for rows, strategy in _ROUTES if op == "linear" else _ROUTES[::2]:
        a = mx.array(rng.standard_normal((rows, width)).astype(np.float32)).astype(dtype)
        got = getattr(kernels, op)(a, w, strategy=strategy)
        pairs.append((_host(got), _host(getattr(ops_reference, op)(a, w))))
    return pairs


def trusted(op: str, dtype: mx.Dtype) -> bool:
    """Whether the Metal kernels of `op` ("dequantize", "linear", "linear_grad_input") in `dtype` passed
    their self-check on the default device (run on first use, then cached)."""
    from . import ops_metal

    device = str(mx.default_device())
    return kernel_self_check.trusted(
        "metal", op, dtype, device, lambda: _pairs(ops_metal, op, dtype), exact=op == "dequantize"
    )
