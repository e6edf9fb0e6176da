"""`NF4Linear`: a frozen linear layer whose weight is NF4; autograd that never keeps W dequantized."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import nf4core
from nf4core.state_dict import nf4_to_state_dict

from . import cpu_gemv, dequant_cache, ops
from .cpu_matmul import frozen_matmul_dtype
from .dequant_cache import active_cache
from .dispatch import use_host
from .nf4_weight import NF4Weight

_BUFFERS = ("packed", "absmax", "nested_codes", "nested_scales", "nested_quant_map", "quant_map")


class _NF4Matmul(torch.autograd.Function):
    """y = x @ W^T. Saves no tensor: backward dequantizes W again (or runs the fused dY @ W kernel),
    so the dequantized weight exists only inside each of the two calls. W gets no gradient. The
    matmuls run in `matmul_dtype` (x's own, or BF16 on CPUs with native BF16: cpu_matmul.py)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: NF4Weight, matmul_dtype: torch.dtype) -> torch.Tensor:
        ctx.weight = weight  # packed codes and scales only: ~4.1 bits per weight
        ctx.matmul_dtype = matmul_dtype
        return base_matmul(x, weight, matmul_dtype).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = base_matmul_grad_input(grad_out, ctx.weight, ctx.matmul_dtype)
            grad_x = grad_x.to(grad_out.dtype)
        return grad_x, None, None


def base_matmul(x: torch.Tensor, weight: NF4Weight, matmul_dtype: torch.dtype) -> torch.Tensor:
    """x (..., in) @ W^T -> (..., out) in `matmul_dtype`: through `ops` in x's own dtype, else W
    dequantized bit-exactly and rounded to `matmul_dtype` as the matmul's input, like x."""
    if matmul_dtype == x.dtype:
        return ops.linear(x, weight)
    return x.to(matmul_dtype) @ ops.dequantize(weight, matmul_dtype).t()


def base_matmul_grad_input(
    grad_out: torch.Tensor, weight: NF4Weight, matmul_dtype: torch.dtype
) -> torch.Tensor:
    """dY (..., out) @ W -> (..., in) in `matmul_dtype` (see `base_matmul`)."""
    if matmul_dtype == grad_out.dtype:
        return ops.linear_grad_input(grad_out, weight)
    return grad_out.to(matmul_dtype) @ ops.dequantize(weight, matmul_dtype)


def cached_weight(w: NF4Weight, dtype: torch.dtype) -> torch.Tensor | None:
    """The dequantized weight from the active DequantCache, or None: no active cache (see
    `active_cache`), over budget, or not the host's auto path (a GPU's fused 4-bit kernels read less
    memory than a dense copy would; a forced reference or triton path runs as forced)."""
    cache = active_cache()
    if cache is None or not use_host(w.packed):
        return None
    return cache.dense(w.tensors(), w.numel, dtype, lambda: ops.dequantize(w, dtype))


def nf4_linear(
    x: torch.Tensor, weight: NF4Weight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Functional form: x (..., in) -> (..., out), computed in x's dtype. With autograd off inside
    an active `DequantCache` (generation), the cached dequantized weight is used, unless the CPU
    GEMV kernel covers x (few rows): it reads the 4-bit codes and needs no dense copy."""
    dense = None if dequant_cache.gemv_covers(x) else cached_weight(weight, x.dtype)
    if dense is not None:
        y = F.linear(x, dense)
    else:
        matmul_dtype = frozen_matmul_dtype(x, x.numel() // max(x.shape[-1], 1))
        y = _NF4Matmul.apply(x, weight, matmul_dtype)
    return y if bias is None else y + bias.to(y.dtype)


class NF4Linear(nn.Module):
    """A frozen linear layer with an NF4 weight (bitsandbytes layout) and an optional dense bias.

    The NF4 data are buffers, so `module.to(device)` moves them like any module; computation happens
    in the input's dtype.
    """

    def __init__(self, weight: NF4Weight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if len(weight.shape) != 2:
            raise ValueError(f"NF4Linear needs a 2-D weight, got shape {weight.shape}")
        for name in _BUFFERS:
            self.register_buffer(name, getattr(weight, name))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.out_features, self.in_features = weight.shape
        self._meta = dict(
            nested_offset=weight.nested_offset,
            nested_blocksize=weight.nested_blocksize,
            shape=weight.shape,
            dtype=weight.dtype,
            blocksize=weight.blocksize,
        )

    @property
    def weight(self) -> NF4Weight:
        """The NF4 weight as it is now (on the module's current device)."""
        return NF4Weight(**{name: getattr(self, name) for name in _BUFFERS}, **self._meta)

    @classmethod
    def from_nf4(
        cls, t: nf4core.NF4Tensor, bias: np.ndarray | torch.Tensor | None = None
    ) -> NF4Linear:
        """From an `nf4core.NF4Tensor` of shape (out, in), bit for bit (on the CPU)."""
        if bias is not None and not isinstance(bias, torch.Tensor):
            bias = torch.from_numpy(np.array(bias, dtype=np.float32))
        return cls(NF4Weight.from_nf4(t), bias)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True
    ) -> NF4Linear:
        """Quantize a dense `nn.Linear` with nf4core (the weight goes through the host once)."""
        w = linear.weight.detach().float().cpu().numpy()
        t = nf4core.quantize(w, blocksize=blocksize, double_quant=double_quant)
        bias = None if linear.bias is None else linear.bias.detach().float().cpu()
        return cls.from_nf4(t, bias).to(linear.weight.device)

    def to_nf4(self) -> nf4core.NF4Tensor:
        """The weight as an `nf4core.NF4Tensor` on the host, bit for bit."""
        return self.weight.to_nf4()

    def bnb_state_dict(self, prefix: str) -> dict[str, np.ndarray]:
        """bitsandbytes' state-dict entries for a module named `prefix` (`<prefix>.weight`,
        `.absmax`, `.quant_map`, nested data, quant_state JSON), plus `<prefix>.bias` if any."""
        out = nf4_to_state_dict(self.to_nf4(), prefix)
        if self.bias is not None:
            out[f"{prefix}.bias"] = self.bias.detach().float().cpu().numpy()
        return out

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight (out, in) in `dtype`, bit-exact with nf4core.dequantize."""
        return ops.dequantize(self.weight, dtype)

    def get_extra_state(self) -> dict:
        """The scalar metadata (blocksize, shape, dtype, nested offset) travels in the state dict."""
        return {
            **self._meta,
            "shape": list(self._meta["shape"]),
            "format_version": nf4core.FORMAT_VERSION,
        }

    def set_extra_state(self, state: dict) -> None:
        meta = {k: state[k] for k in self._meta}
        meta["shape"] = tuple(meta["shape"])
        if meta["shape"] != self._meta["shape"]:
            raise ValueError(
                f"state dict holds an NF4 weight of shape {meta['shape']}, "
                f"this layer has {self._meta['shape']}"
            )
        self._meta = meta

    def _apply(self, fn, recurse: bool = True):
        """Module.to/cuda/half/...: NF4 data follow the device but keep their dtypes (a cast would
        change the format's numbers); the bias is cast like any buffer."""
        before = {n: getattr(self, n) for n in _BUFFERS if getattr(self, n) is not None}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = getattr(self, name)
            if new.dtype != old.dtype:
                setattr(self, name, old.to(new.device))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        held = self._buffers  # skips Module.__getattr__ per buffer (per-token overhead)
        if not torch.is_grad_enabled() and dequant_cache.gemv_covers(x):  # decoding: the 4-bit GEMV
            if x.shape[-1] != self.in_features or held["packed"].device != x.device:
                return nf4_linear(x, self.weight, self.bias)  # ops.linear's checks say why
            m, bias = self._meta, held["bias"]
            y = cpu_gemv.linear_parts(
                x,
                *(held[n] for n in _BUFFERS),
                m["nested_offset"],
                m["nested_blocksize"],
                m["blocksize"],
                self.out_features,
            )
            return y if bias is None else y + bias.to(y.dtype)
        cache = active_cache()
        if cache is not None:  # generation: skip building an NF4Weight per call
            tensors = [held[n] for n in _BUFFERS if held[n] is not None]
            numel = self.out_features * self.in_features
            dense = cache.dense(tensors, numel, x.dtype, lambda: self.dequantize(x.dtype))
            if dense is not None:
                return F.linear(x, dense, None if self.bias is None else self.bias.to(x.dtype))
        return nf4_linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        dq = "double-quant" if self.nested_codes is not None else "plain absmax"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"blocksize={self._meta['blocksize']}, {dq}, bias={self.bias is not None}"
        )
