"""RMSNorm, the SwiGLU MLP, and how a linear layer is built from a (possibly quantized) weight."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import nf4core

from ..nf4_linear import NF4Linear


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, normalised in float32 (as Llama does)."""

    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., C)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def make_linear(
    weight: object,
    bias: np.ndarray | None,
    quantize: bool,
    blocksize: int,
    double_quant: bool,
    dtype: torch.dtype,
    method: str = "absmax",
    base_dtype: torch.dtype | None = None,
) -> nn.Module:
    """A frozen linear from a weight: NF4Linear for an NF4Tensor (or a dense one when `quantize`,
    by `method`), else an nn.Linear in `dtype` holding the weight rounded to `base_dtype` (when
    given). The dense weight is dropped as soon as it is quantized."""
    if isinstance(weight, nf4core.NF4Tensor):
        return NF4Linear.from_nf4(weight, bias)
    array = _as_numpy(weight)
    if quantize:
        return NF4Linear.from_nf4(nf4core.quantize(array, blocksize, double_quant, method), bias)
    out_f, in_f = array.shape
    layer = nn.Linear(in_f, out_f, bias=bias is not None, dtype=dtype)
    with torch.no_grad():
        dense = torch.from_numpy(array)
        layer.weight.copy_(dense.to(base_dtype) if base_dtype is not None else dense)
        if bias is not None:
            layer.bias.copy_(torch.from_numpy(_as_numpy(bias)))
    return layer.requires_grad_(False)


def _as_numpy(a: object) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().float().cpu().numpy()
    a = np.asarray(a)
    return a if a.dtype == np.float32 and a.flags.writeable else a.astype(np.float32)
