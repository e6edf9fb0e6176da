"""The kernels' self-checks (see backends/kernel_self_check.py): each Triton op family on a tiny
weight against ops_reference, on the device the caller's tensor is on; the CPU GEMV (cpu_gemv.py)
on two tiny weights (even and odd K), alone and as a group of two; the C decoder (cpu_dequant.py).
Dequantize (and the block scales) must match bit for bit; the matmuls, GEMV and tiled, within the
dtype's tolerance."""

from __future__ import annotations

import functools

import numpy as np
import torch

import nf4core
from backends import kernel_self_check

from . import ops_reference
from .nf4_weight import NF4Weight

OPS = ("dequantize", "linear", "linear_grad_input")
_OUT, _IN = 20, 70  # neither a multiple of a tile; 22 blocks of 64, the last one partial
_ROWS = (3, 9)  # the GEMV kernel (<= 8 rows) and the tiled matmul kernel


@functools.cache
def _nf4() -> nf4core.NF4Tensor:
    w = np.random.default_rng(11).standard_normal((_OUT, _IN)).astype(np.float32)
    return nf4core.quantize(w, blocksize=64, double_quant=True)


def _host(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def _pairs(kernels, op: str, dtype: torch.dtype, device: torch.device) -> kernel_self_check.Pairs:
    w = NF4Weight.from_nf4(_nf4(), device)
    if op == "dequantize":
        return [
            (_host(kernels.block_absmax(w)), _host(ops_reference.block_absmax(w))),
            (_host(kernels.dequantize(w, dtype)), _host(ops_reference.dequantize(w, dtype))),
        ]
    gen = torch.Generator().manual_seed(5)
    width = _IN if op == "linear" else _OUT
    pairs = []
    for rows in _ROWS:
        a = torch.randn(rows, width, generator=gen).to(device=device, dtype=dtype)
        pairs.append((_host(getattr(kernels, op)(a, w)), _host(getattr(ops_reference, op)(a, w))))
    return pairs


def trusted(op: str, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the Triton kernels of `op` ("dequantize", "linear", "linear_grad_input") in `dtype`
    passed their self-check on `device` (run on first use, then cached)."""
    from . import ops_triton

    def run() -> kernel_self_check.Pairs:  # the caller's autocast must not reach the reference
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            return _pairs(ops_triton, op, dtype, device)

    return kernel_self_check.trusted(
        "triton", op, dtype, str(device), run, exact=op == "dequantize"
    )


_GEMV_ODD = (7, 45)  # odd K: rows start mid-byte (the kernel's scalar path); blocksize 32


@functools.cache
def _nf4_odd() -> nf4core.NF4Tensor:
    w = np.random.default_rng(12).standard_normal(_GEMV_ODD).astype(np.float32)
    return nf4core.quantize(w, blocksize=32, double_quant=False)


def _gemv_pairs(dtype: torch.dtype) -> kernel_self_check.Pairs:
    from . import cpu_gemv

    gen = torch.Generator().manual_seed(6)
    pairs = []
    for t in (_nf4(), _nf4_odd()):
        w = NF4Weight.from_nf4(t)
        group = cpu_gemv.GemvGroup([w, w])  # the fast decoder's q/k/v and gate/up calls
        for rows in (1, cpu_gemv.MAX_ROWS):
            x = torch.randn(rows, w.shape[1], generator=gen).to(dtype)
            want = _host(ops_reference.linear(x, w))
            pairs.append((_host(cpu_gemv.linear(x, w)), want))
            pairs.append((_host(group(x)), np.concatenate([want, want], axis=-1)))
    return pairs


def cpu_gemv_trusted(dtype: torch.dtype) -> bool:
    """Whether the CPU GEMV kernel (cpu_gemv.py) in `dtype` builds and matches ops_reference.linear
    (run on first use, then cached); a failed build is one warning, like a wrong result."""

    def run() -> kernel_self_check.Pairs:
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            return _gemv_pairs(dtype)

    return kernel_self_check.trusted("cpu", "linear", dtype, "cpu", run, exact=False)


def c_decoder_trusted(dtype: torch.dtype) -> bool:
    """Whether the C decoder (cpu_dequant.py) builds and decodes bit for bit like ops_reference in
    `dtype` (checked on first use, then cached)."""
    from . import cpu_dequant

    def run() -> kernel_self_check.Pairs:
        weights = [NF4Weight.from_nf4(_nf4())]  # blocks of 64, the last one partial
        wide = np.random.default_rng(12).standard_normal((3, 200)).astype(np.float32)
        weights.append(NF4Weight.from_nf4(nf4core.quantize(wide, blocksize=32)))
        pairs = []
        for w in weights:
            pairs.append((_host(cpu_dequant.block_absmax(w)), _host(ops_reference.block_absmax(w))))
            pairs.append(
                (_host(cpu_dequant.dequantize(w, dtype)), _host(ops_reference.dequantize(w, dtype)))
            )
        return pairs

    return kernel_self_check.trusted("c", "dequantize", dtype, "cpu", run, exact=True)


def _decode_pairs() -> kernel_self_check.Pairs:
    """The decode projection (RMSNorm, a group of three weights, RoPE on 4 heads of 10, the key and
    value heads into a cache at position 1; then a residual add) against the torch ops."""
    from . import cpu_gemv

    gen = torch.Generator().manual_seed(7)
    w = NF4Weight.from_nf4(_nf4())  # (20, 70): 3 of them are 6 heads of 10
    rows, heads, kv, d, p = 2, 4, 1, 10, 1

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    x, norm, cos, sin = randn(rows, _IN), randn(_IN), randn(3, d), randn(3, d)
    y, keys, values = (
        torch.empty(rows, 3 * _OUT),
        torch.zeros(rows, kv, 3, d),
        torch.zeros(rows, kv, 3, d),
    )
    group = cpu_gemv.GemvGroup([w, w, w])
    cpu_gemv.DecodeProjection(group, y, False, (norm, 1e-5), (cos, sin, heads, kv), (keys, values))(
        x, p
    )
    h = norm * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    want = torch.cat([ops_reference.linear(h, w)] * 3, dim=-1)
    qk = want[:, : heads * d].view(rows, heads, d)
    qk = qk * cos[p] + torch.cat([qk[..., d // 2 :], qk[..., : d // 2]], dim=-1) * sin[p]
    want[:, : heads * d] = qk.reshape(rows, -1)
    residual = randn(rows, _OUT)
    added = residual.clone()
    cpu_gemv.DecodeProjection(cpu_gemv.GemvGroup([w]), added, True)(x, p)
    return [
        (_host(y), _host(want)),
        (_host(keys[:, :, p]), _host(qk[:, heads - kv :])),
        (_host(values[:, :, p]), _host(want[:, heads * d : (heads + kv) * d].view(rows, kv, d))),
        (_host(added), _host(residual + ops_reference.linear(x, w))),
    ]


def cpu_decode_trusted() -> bool:
    """Whether the CPU decode projection (cpu_gemv.DecodeProjection: RMSNorm, a GEMV group, RoPE
    and the KV cache write in one call; float32) matches the torch ops (checked on first use)."""

    def run() -> kernel_self_check.Pairs:
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            return _decode_pairs()

    return kernel_self_check.trusted(
        "cpu", "decode projection", torch.float32, "cpu", run, exact=False
    )
