"""`NF4Linear`: a frozen linear layer whose weight is NF4; y = x W^T (+ b)."""

from __future__ import annotations

import numpy as np

import nf4core
from nf4core import NF4Tensor

from . import dispatch
from ._mlx import mx, nn
from .nf4_weight import NF4Weight


def _nf4_matmul_fn(weight: NF4Weight):
    """x @ W^T as an mx.custom_function whose vjp dequantizes again (or runs the fused kernel).

    The forward's dequantized weight is a temporary of the forward only; backward never refers to it,
    so no layer keeps a 16/32-bit copy of its weight alive between forward and backward.
    """

    @mx.custom_function
    def linear(x):
        return dispatch.linear(x, weight)

    @linear.vjp
    def matmul_vjp(primals, cotangent, output):
        return (dispatch.linear_grad_input(cotangent, weight),)

    return linear


class NF4Linear(nn.Module):
    """A frozen NF4 linear layer (bitsandbytes' Linear4bit); computes in the input's dtype.

    Args:
        weight: the (out_features, in_features) weight as an `NF4Weight`.
        bias: optional (out_features,) bias, frozen (Qwen2's q/k/v projections have one).
    """

    def __init__(self, weight: NF4Weight, bias: mx.array | None = None) -> None:
        super().__init__()
        if len(weight.shape) != 2:
            raise ValueError(f"an NF4Linear weight must be 2-d (out, in), got shape {weight.shape}")
        self.nf4 = weight  # not an mx.array: never a parameter, never trained
        if bias is not None:
            if bias.shape != (weight.shape[0],):
                raise ValueError(
                    f"bias shape {bias.shape} does not match {weight.shape[0]} outputs"
                )
            self.bias = bias
        self._matmul = _nf4_matmul_fn(weight)
        self.freeze()

    @classmethod
    def from_nf4(cls, t: NF4Tensor, bias: mx.array | np.ndarray | None = None) -> NF4Linear:
        return cls(NF4Weight.from_nf4(t), None if bias is None else mx.array(bias))

    @classmethod
    def from_dense(
        cls,
        weight: np.ndarray,
        bias: np.ndarray | None = None,
        blocksize: int = 64,
        double_quant: bool = True,
        method: str = "absmax",
    ) -> NF4Linear:
        """Quantize a dense (out, in) weight with nf4core (the one quantizer of the project)."""
        t = nf4core.quantize(
            np.asarray(weight), blocksize=blocksize, double_quant=double_quant, method=method
        )
        return cls.from_nf4(t, bias)

    @property
    def in_features(self) -> int:
        return self.nf4.shape[1]

    @property
    def out_features(self) -> int:
        return self.nf4.shape[0]

    def to_nf4(self) -> NF4Tensor:
        return self.nf4.to_nf4()

    def dequantized_weight(self, dtype: mx.Dtype = mx.float32) -> mx.array:
        """(out, in) in `dtype`, bit-exact with nf4core."""
        return dispatch.dequantize(self.nf4, dtype)

    def __call__(self, x: mx.array) -> mx.array:  # (..., in) -> (..., out)
        y = self._matmul(x)
        if "bias" in self:
            y = y + self.bias.astype(y.dtype)
        return y
