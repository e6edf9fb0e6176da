"""LoRA on a frozen NF4 base as one autograd node: y = x W^T + (x A^T) (s B)^T.

The unfused LoRALinear records the base matmul, two adapter matmuls, a scale and an add, and autograd
adds the base's and the adapter's input gradients in another pass. Here the adapter output is the
buffer the base output is added into (forward), and the adapter's input gradient the one the
base's dY W is added into (backward): three fewer passes over (rows, out) or (rows, in) per linear
each way. What it saves for backward is what the unfused path saves: x (which it shares with the
other linears reading the same input) and the (rows, r) product x A^T; never W, which backward
dequantizes again. It serves LoRA without dropout (or in eval) and without DoRA; LoRALinear takes the
unfused path otherwise.
"""

from __future__ import annotations

import torch

from .nf4_linear import base_matmul, base_matmul_grad_input
from .nf4_weight import NF4Weight


class _LoRANF4(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        weight: NF4Weight,
        scale: float,
        matmul_dtype: torch.dtype,
        base_output: bool,
    ) -> torch.Tensor:
        # x (..., in); a (r, in); b (out, r); all in x's dtype
        rows = x.reshape(-1, x.shape[-1])  # (M, in)
        h = rows @ a.t()  # (M, r)
        scaled_b = b * scale  # (out, r)
        y = h @ scaled_b.t()  # (M, out)
        if base_output:
            y += base_matmul(rows, weight, matmul_dtype)  # a BF16 base output is added as FP32
        ctx.save_for_backward(rows, h, a, scaled_b)
        ctx.weight, ctx.scale, ctx.matmul_dtype = weight, scale, matmul_dtype
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        rows, h, a, scaled_b = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])  # (M, out)
        grad_h = g @ scaled_b  # (M, r)
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[1]:
            grad_a = grad_h.t() @ rows  # (r, in)
        if ctx.needs_input_grad[2]:
            grad_b = (g.t() @ h).mul_(ctx.scale)  # (out, r)
        if ctx.needs_input_grad[0]:
            grad_x = grad_h @ a  # (M, in)
            grad_x += base_matmul_grad_input(g, ctx.weight, ctx.matmul_dtype)
            grad_x = grad_x.reshape(*grad_out.shape[:-1], grad_x.shape[-1])
        return grad_x, grad_a, grad_b, None, None, None, None


def lora_nf4_linear(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    weight: NF4Weight,
    scale: float,
    matmul_dtype: torch.dtype,
    base_output: bool = True,
) -> torch.Tensor:
    """x (..., in) -> (..., out) = x W^T + scale * x A^T B^T in x's dtype, the base matmuls in
    `matmul_dtype` (see nf4_linear.base_matmul); a (r, in) and b (out, r) in x's dtype.

    `base_output=False` leaves x W^T out of the output (only the adapter term remains) while
    backward is the same: for a recompute that needs what this node saves, not what it returns."""
    return _LoRANF4.apply(x, a, b, weight, scale, matmul_dtype, base_output)
