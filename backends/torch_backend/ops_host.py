"""NF4 ops for CPU tensors (auto mode): the C decoder of cpu_dequant.py for float32 and bfloat16
once it has passed its self-check, else nf4core's numpy decoder. The numpy decoder is the spec itself
(bit-exact by construction), works on cache-sized slices on every core, and on the CPU runs about 5x
faster than the torch gather of ops_reference (2.0 vs 11.6 ms for a 1536x576 weight on a 2-core
Xeon); the C decoder makes the same numbers in one pass (0.24 vs 0.60 ms to float32, 0.27 vs
0.97 ms to bfloat16 for that weight on a 2-core AMD EPYC).
"""

from __future__ import annotations

import torch

from nf4core import blockwise

from . import cpu_dequant, ops_reference
from .nf4_weight import NF4Weight
from .self_check import c_decoder_trusted

block_absmax = ops_reference.block_absmax


def dequantize(w: NF4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight in its original shape: quant_map[code] * absmax in float32, then cast to dtype."""
    if dtype in cpu_dequant.DTYPES and c_decoder_trusted(dtype):
        return cpu_dequant.dequantize(w, dtype)
    values = blockwise.decode_nf4(
        w.packed.numpy(), block_absmax(w).numpy(), w.numel, w.blocksize, w.quant_map.numpy()
    )
    return torch.from_numpy(values).to(dtype).reshape(w.shape)


def linear(x: torch.Tensor, w: NF4Weight) -> torch.Tensor:
    """x @ W^T in x's dtype. x (..., in), W (out, in) -> (..., out)."""
    return x @ dequantize(w, x.dtype).t()


def linear_grad_input(grad_out: torch.Tensor, w: NF4Weight) -> torch.Tensor:
    """dY @ W in dY's dtype. dY (..., out), W (out, in) -> (..., in)."""
    return grad_out @ dequantize(w, grad_out.dtype)
