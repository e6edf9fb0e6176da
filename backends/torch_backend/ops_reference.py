"""Plain-torch reference ops on `NF4Weight`: the twin of every Triton kernel, bit-exact with nf4core.

They run on any device and in any float dtype; float64 compute serves gradcheck.
"""

from __future__ import annotations

import torch

from .nf4_weight import NF4Weight


def block_absmax(w: NF4Weight) -> torch.Tensor:
    """float32 (n_blocks,): the scale of every block.

    With double quant: quant_map[code] * scale, rounded to float32, then + offset, rounded again.
    Two separate eager ops, so no fused multiply-add can change the last bit.
    """
    if w.absmax is not None:
        return w.absmax
    nested_block = torch.arange(w.n_blocks, device=w.device) // w.nested_blocksize  # (n_blocks,)
    scaled = w.nested_quant_map[w.nested_codes.long()] * w.nested_scales[nested_block]
    offset = torch.tensor(w.nested_offset, dtype=torch.float32, device=w.device)
    return scaled + offset


def dequantize(w: NF4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight in its original shape: quant_map[code] * absmax in float32, then cast to dtype."""
    absmax = block_absmax(w)
    # byte -> the two float32 values it codes (high nibble first): (256, 2)
    byte = torch.arange(256, device=w.device)
    pairs = torch.stack([w.quant_map[byte >> 4], w.quant_map[byte & 0x0F]], dim=1)
    values = pairs[w.packed.long()].reshape(-1)[: w.numel]  # (numel,) float32
    full = w.numel - w.numel % w.blocksize
    out = torch.empty_like(values)
    out[:full].view(-1, w.blocksize).copy_(values[:full].view(-1, w.blocksize) * absmax[: full // w.blocksize, None])
    if full < w.numel:
        out[full:] = values[full:] * absmax[-1]
    return out.to(dtype).reshape(w.shape)


def linear(x: torch.Tensor, w: NF4Weight) -> torch.Tensor:
    """x @ W^T in x's dtype. x (..., in), W (out, in) -> (..., out)."""
    return x @ dequantize(w, x.dtype).t()


def linear_grad_input(grad_out: torch.Tensor, w: NF4Weight) -> torch.Tensor:
    """dY @ W in dY's dtype. dY (..., out), W (out, in) -> (..., in)."""
    return grad_out @ dequantize(w, grad_out.dtype)
