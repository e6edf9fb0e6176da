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
    nb = w.nested_blocksize
    values = torch.index_select(w.nested_quant_map, 0, w.nested_codes.int())  # (n_blocks,)
    scaled = torch.empty_like(values)
    _scale_blocks(values, w.nested_scales, nb, out=scaled)
    return scaled + torch.tensor(w.nested_offset, dtype=torch.float32, device=w.device)


def _scale_blocks(
    values: torch.Tensor, scales: torch.Tensor, blocksize: int, out: torch.Tensor
) -> None:
    """out[e] = values[e] * scales[e // blocksize] (float32, one rounding); out may be values."""
    full = values.numel() - values.numel() % blocksize
    torch.mul(
        values[:full].view(-1, blocksize),
        scales[: full // blocksize, None],
        out=out[:full].view(-1, blocksize),
    )
    if full < values.numel():
        torch.mul(values[full:], scales[-1], out=out[full:])


def _byte_pairs(quant_map: torch.Tensor) -> torch.Tensor:
    """(256,) int64: the two float32 code values of every byte value (high nibble first), bit-packed
    so one gather decodes a whole byte."""
    byte = torch.arange(256, device=quant_map.device)
    pairs = torch.stack([quant_map[byte >> 4], quant_map[byte & 0x0F]], dim=1).contiguous()
    return pairs.view(torch.int64).view(256)


def dequantize(w: NF4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight in its original shape: quant_map[code] * absmax in float32, then cast to dtype."""
    absmax = block_absmax(w)
    decoded = torch.index_select(_byte_pairs(w.quant_map), 0, w.packed.int())  # (n_bytes,) pairs
    values = decoded.view(torch.float32)[: w.numel]  # (numel,) code values
    _scale_blocks(values, absmax, w.blocksize, out=values)
    return values.to(dtype).reshape(w.shape)


def linear(x: torch.Tensor, w: NF4Weight) -> torch.Tensor:
    """x @ W^T in x's dtype. x (..., in), W (out, in) -> (..., out)."""
    return x @ dequantize(w, x.dtype).t()


def linear_grad_input(grad_out: torch.Tensor, w: NF4Weight) -> torch.Tensor:
    """dY @ W in dY's dtype. dY (..., out), W (out, in) -> (..., in)."""
    return grad_out @ dequantize(w, grad_out.dtype)
