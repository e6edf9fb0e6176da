"""Plain-mlx reference ops on an `NF4Weight`: the twin of every Metal kernel (and the CPU path).

Each result equals nf4core's numpy spec: dequantize bit for bit, matmuls up to float rounding.
"""

from __future__ import annotations

from ._mlx import mx
from .nf4_weight import NF4Weight


def reconstruct_absmax(w: NF4Weight) -> mx.array:
    """float32 (n_blocks,) block scales; for double quant: map[code] * scale, round, + offset, round.

    Note (FMA): the products are formed as a (n_nested, 256) table and then gathered, so the add of
    the offset never meets a multiply in one fused elementwise kernel (mx.compile fuses elementwise
    chains, and a compiler may contract a fused multiply-add); the gather makes MLX round each
    product to float32 in memory first. On a Metal GPU the dispatcher uses the two-launch kernels
    metal/nf4_absmax_scale.metal and metal/nf4_absmax_offset.metal for the same reason.
    """
    if w.absmax is not None:
        return w.absmax
    products = (w.dq_scales[:, None] * w.dq_quant_map[None, :]).reshape(-1)  # (n_nested * 256,)
    block = mx.arange(w.n_blocks, dtype=mx.uint32)
    index = (block // w.dq_blocksize) * 256 + w.dq_codes.astype(mx.uint32)  # (n_blocks,)
    return mx.take(products, index) + mx.array(w.dq_offset, dtype=mx.float32)


def decode_codes(packed: mx.array) -> mx.array:
    """uint32 (2 * bytes,) codes in element order: high nibble first (bitsandbytes' order)."""
    high = mx.right_shift(packed, 4)
    low = mx.bitwise_and(packed, 15)
    return mx.stack([high, low], axis=-1).reshape(-1).astype(mx.uint32)


def pair_table(quant_map: mx.array) -> mx.array:
    """uint64 (256,): the two float32 code values a packed byte stands for, high nibble first.

    Gathering one 8-byte entry per packed byte decodes two elements at once, with no per-element
    code array (half the time of a per-element lookup on the CPU, a quarter of the transient memory).
    """
    byte = mx.arange(256, dtype=mx.uint32)
    pairs = mx.stack([mx.take(quant_map, byte >> 4), mx.take(quant_map, byte & 15)], axis=1)
    return pairs.view(mx.uint64).reshape(256)  # (256, 2) float32 -> one uint64 per row


def dequantize_with_absmax(
    w: NF4Weight, absmax: mx.array, dtype: mx.Dtype = mx.float32, after: mx.array | None = None
) -> mx.array:
    """The weight in `dtype` and its shape: float32 quant_map[code] * absmax[block], one rounding.

    `after`: an array this dequantization must wait for (see `linear`).
    """
    packed = w.packed if after is None else mx.depends(w.packed, after)
    values = mx.take(pair_table(w.quant_map), packed).view(mx.float32)  # (2 * bytes,)
    padded = w.n_blocks * w.blocksize
    if values.size < padded:
        values = mx.concatenate([values, mx.zeros((padded - values.size,), dtype=mx.float32)])
    blocks = values[:padded].reshape(w.n_blocks, w.blocksize) * absmax[:, None]
    return blocks.reshape(-1)[: w.numel].astype(dtype).reshape(w.shape)


def dequantize(w: NF4Weight, dtype: mx.Dtype = mx.float32) -> mx.array:
    """The weight in `dtype`, bit-exact with `nf4core.dequantize(t, dtype)`."""
    return dequantize_with_absmax(w, reconstruct_absmax(w), dtype)


def linear(
    x: mx.array, w: NF4Weight, absmax: mx.array | None = None, strategy: str = "dequant"
) -> mx.array:
    """x @ W^T for x (..., in) and W (out, in): (..., out), in x's dtype.

    Note (memory): a dequantization depends only on constants, so MLX's scheduler may run those of
    every layer first and hold them all at once. `mx.depends` makes each one wait for its input x,
    which keeps one dequantized weight alive at a time.
    """
    absmax = reconstruct_absmax(w) if absmax is None else absmax
    return x @ dequantize_with_absmax(w, absmax, x.dtype, after=x).T


def linear_grad_input(
    g: mx.array, w: NF4Weight, absmax: mx.array | None = None, strategy: str = "dequant"
) -> mx.array:
    """g @ W for g (..., out): (..., in), the input gradient of `linear`. (`strategy` exists for
    signature parity with ops_metal; the reference always dequantizes.)"""
    absmax = reconstruct_absmax(w) if absmax is None else absmax
    return g @ dequantize_with_absmax(w, absmax, g.dtype, after=g)
