"""NF4 dequantize on the CPU in C (cpu/nf4_dequant.c, whose header says what it computes and its
layout): one pass from packed codes to FP32 or BF16, for the training path. The numpy decoder
(ops_host) makes three passes for BF16 (gather, scale, cast); this makes one, with AVX-512 where the
compiler targets it.

How it is built: by native_build.py with the system C compiler, once per source, flags, compiler and
CPU; ctypes calls it (one call per weight, on the calling thread; double-quant block scales are
rebuilt in C too). How it is trusted: in auto mode it self-checks once per process against
ops_reference (bit for bit) and is skipped with one warning line if it fails to build or disagrees.
How to test it: tests/backends/torch_backend/test_cpu_dequant.py (bit-exact against nf4core and
torch's cast).
"""

from __future__ import annotations

import ctypes
import functools

import torch

from . import native_build
from .nf4_weight import NF4Weight

DTYPES = (torch.float32, torch.bfloat16)

SOURCE = "nf4_dequant.c"
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fPIC", "-shared")


@functools.cache
def library() -> ctypes.CDLL:
    """The compiled decoder (built on first use; native_build.NativeUnavailable if it cannot be)."""
    lib = native_build.load(SOURCE, FLAGS)
    args = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_void_p]
    for name in ("nf4_decode_f32", "nf4_decode_bf16"):
        getattr(lib, name).argtypes = args
        getattr(lib, name).restype = None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.nf4_block_absmax.argtypes = [p, p, p, i64, i64, ctypes.c_float, p]
    lib.nf4_block_absmax.restype = None
    return lib


def block_absmax(w: NF4Weight) -> torch.Tensor:
    """float32 (n_blocks,) block scales (CPU), bit-exact with ops_reference.block_absmax."""
    if w.absmax is not None:
        return w.absmax.contiguous()
    codes, scales = w.nested_codes.contiguous(), w.nested_scales.contiguous()
    nested_map = w.nested_quant_map.contiguous()
    out = torch.empty(w.n_blocks, dtype=torch.float32)
    library().nf4_block_absmax(
        codes.data_ptr(),
        nested_map.data_ptr(),
        scales.data_ptr(),
        w.n_blocks,
        w.nested_blocksize,
        w.nested_offset,
        out.data_ptr(),
    )
    return out


def dequantize(w: NF4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W (CPU) in `dtype` (float32 or bfloat16) and its original shape, decoded in one pass on
    the calling thread (a thread pool costs more than it saves at the sizes of a model's linears;
    torch's matmuls use the cores)."""
    if dtype not in DTYPES or w.packed.device.type != "cpu":
        raise ValueError(f"the C decoder makes float32 or bfloat16 on the CPU, not {dtype}")
    lib = library()
    packed = w.packed.contiguous()
    absmax = block_absmax(w)
    qmap = w.quant_map.to(torch.float32).contiguous()
    out = torch.empty(w.numel, dtype=dtype)
    fn = lib.nf4_decode_f32 if dtype == torch.float32 else lib.nf4_decode_bf16
    fn(
        packed.data_ptr(),
        absmax.data_ptr(),
        qmap.data_ptr(),
        0,
        w.numel,
        w.blocksize,
        out.data_ptr(),
    )
    return out.reshape(w.shape)
