"""The CPU NF4 GEMV (cpu/nf4_gemv.cpp): x @ W^T for few rows of x, reading the packed 4-bit codes
instead of a dequantized weight. Built on first use with the system C++ compiler (-O3 -march=native,
OpenMP) by native_build.py and called through ctypes. No compiler, or a failed build, raises
`native_build.NativeUnavailable`; in auto mode the self-check turns that into one warning and the
reference path.

Which calls take it (dequant_cache.gemv_covers, next to the cache it competes with): CPU tensors in
float32 or bfloat16 (bfloat16 is computed in float32 and rounded once at the end) with few rows, in
auto mode once the kernel passed its self-check, or always with NF4_KERNELS=cpu (forced, unchecked).
`GemvGroup` runs the weights of linears that read the same input (q/k/v, gate/up) in one call.
"Few" depends on the alternative: at most MAX_ROWS rows while a DequantCache with a budget is active
(a dense matmul on a cached weight wins beyond), at most MAX_ROWS_PER_CALL otherwise (the
alternative dequantizes the whole weight per call).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import torch

from . import native_build

SOURCE = "nf4_gemv.cpp"
# Row limits of auto mode, measured with bench/decode_vs_transformers.py (see BENCHMARKS.md).
MAX_ROWS = 8  # vs F.linear on a cached dense weight
MAX_ROWS_PER_CALL = 32  # vs dequantizing the weight for the call
DTYPES = (torch.float32, torch.bfloat16)
FLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-std=c++17", "-shared", "-fPIC")
_functions: dict[tuple[str, ...], object] = {}  # nf4_gemv_f32 of each build, looked up lock-free


def build(flags: tuple[str, ...] = FLAGS) -> ctypes.CDLL:
    """The kernel built with `flags` and loaded (native_build.NativeUnavailable if it cannot be)."""
    lib = native_build.load(SOURCE, flags)
    lib.nf4_gemv_isa.restype = ctypes.c_char_p
    p, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    lib.nf4_gemv_f32.argtypes = [p, i64, i64, p, i64, p, p, p, p, f32, i64, p, i64, p]
    lib.nf4_gemv_f32.restype = ctypes.c_int
    lib.nf4_block_scales.argtypes = [p, p, p, f32, i64, i64, p]
    lib.nf4_block_scales.restype = None
    lib.nf4_gemv_group.argtypes = [p, i64, i64, p, i64, p]
    lib.nf4_gemv_group.restype = ctypes.c_int
    lib.nf4_decode_project.argtypes = [p, p, i64, i64]
    lib.nf4_decode_project.restype = ctypes.c_int
    return lib


def isa(flags: tuple[str, ...] = FLAGS) -> str:
    """The instruction set the build runs on: "avx512", "avx2" or "generic"."""
    return build(flags).nf4_gemv_isa().decode()


def _gemv(flags: tuple[str, ...]):
    fn = _functions.get(flags)
    if fn is None:
        fn = _functions[flags] = build(flags).nf4_gemv_f32
    return fn


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def linear_parts(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor | None,
    nested_codes: torch.Tensor | None,
    nested_scales: torch.Tensor | None,
    nested_quant_map: torch.Tensor | None,
    quant_map: torch.Tensor,
    nested_offset: float,
    nested_blocksize: int,
    blocksize: int,
    out_features: int,
    flags: tuple[str, ...] = FLAGS,
) -> torch.Tensor:
    """x (..., in) @ W^T -> (..., out) in x's dtype, from an NF4 weight's tensors (CPU, contiguous:
    the buffers of an NF4Linear or an NF4Weight). Checks what the kernel would otherwise read past.
    Lean on purpose: decoding calls it ~200 times per token."""
    fn = _gemv(flags)
    in_features = x.shape[-1]
    if packed.numel() != (out_features * in_features + 1) // 2:
        raise ValueError(
            f"nf4 linear: input {tuple(x.shape)} does not fit a weight of {out_features} rows "
            f"and {packed.numel()} packed bytes"
        )
    if not (
        packed.is_contiguous()
        and quant_map.is_contiguous()
        and (absmax is None or absmax.is_contiguous())
        and (nested_codes is None or nested_codes.is_contiguous())
        and (nested_scales is None or nested_scales.is_contiguous())
        and (nested_quant_map is None or nested_quant_map.is_contiguous())
    ):
        raise ValueError("nf4 linear: the CPU kernel needs contiguous NF4 tensors")
    rows = x if x.dtype == torch.float32 and x.is_contiguous() else x.float().contiguous()
    y = torch.empty(x.shape[:-1] + (out_features,), dtype=torch.float32)
    status = fn(
        rows.data_ptr(),
        rows.numel() // in_features,
        in_features,
        packed.data_ptr(),
        out_features,
        _ptr(absmax),
        _ptr(nested_codes),
        _ptr(nested_scales),
        _ptr(nested_quant_map),
        nested_offset,
        nested_blocksize,
        quant_map.data_ptr(),
        blocksize,
        y.data_ptr(),
    )
    if status != 0:
        raise ValueError(f"nf4 linear: the CPU kernel refused blocksize {blocksize}")
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def linear(x: torch.Tensor, w, flags: tuple[str, ...] = FLAGS) -> torch.Tensor:
    """x (..., in) @ W^T -> (..., out) for an `NF4Weight` w on the CPU, in x's dtype."""
    return linear_parts(
        x,
        w.packed,
        w.absmax,
        w.nested_codes,
        w.nested_scales,
        w.nested_quant_map,
        w.quant_map,
        w.nested_offset,
        w.nested_blocksize,
        w.blocksize,
        w.shape[0],
        flags,
    )


class _GroupWeight(ctypes.Structure):
    """One weight of a group, as cpu/nf4_gemv.cpp's nf4_group_weight lays it out."""

    _fields_ = [
        ("packed", ctypes.c_void_p),
        ("N", ctypes.c_int64),
        ("absmax", ctypes.c_void_p),
        ("nested_codes", ctypes.c_void_p),
        ("nested_scales", ctypes.c_void_p),
        ("nested_map", ctypes.c_void_p),
        ("nested_offset", ctypes.c_float),
        ("nested_blocksize", ctypes.c_int64),
        ("quant_map", ctypes.c_void_p),
        ("blocksize", ctypes.c_int64),
    ]


class GemvGroup:
    """x (..., in) @ [W_1; W_2; ...]^T -> (..., N_1 + N_2 + ...) in x's dtype, for NF4 weights that
    read the same input, in one kernel call: x is rearranged once and the per-call Python and ctypes
    work is paid once. Column block j holds the same bits as `linear(x, weights[j])`.

    The arguments are checked and packed into a C array once, here; the group holds the weights'
    tensors, so the pointers it passes stay valid for its lifetime (build it per decode: a module
    whose buffers are replaced later is not seen)."""

    def __init__(self, weights: Sequence, flags: tuple[str, ...] = FLAGS) -> None:
        if not weights:
            raise ValueError("nf4 gemv group: no weights")
        self.in_features = weights[0].shape[1]
        self.splits = [w.shape[0] for w in weights]
        self.out_features = sum(self.splits)
        wide = {w.blocksize % 64 == 0 for w in weights}
        for w in weights:
            if len(w.shape) != 2 or w.shape[1] != self.in_features or len(wide) != 1:
                raise ValueError(
                    "nf4 gemv group: the weights need one input width and blocksizes all (or none) "
                    f"multiples of 64; got shapes {[tuple(w.shape) for w in weights]}, blocksizes "
                    f"{[w.blocksize for w in weights]}"
                )
            tensors = [t for t in w.tensors() if t is not None]
            if not all(t.is_cpu and t.is_contiguous() for t in tensors):
                raise ValueError("nf4 gemv group: the CPU kernel needs contiguous CPU NF4 tensors")
        self._held = [w.tensors() for w in weights]  # keeps every pointer below alive
        self._array = (_GroupWeight * len(weights))(
            *(
                _GroupWeight(
                    w.packed.data_ptr(),
                    w.shape[0],
                    _ptr(w.absmax),
                    _ptr(w.nested_codes),
                    _ptr(w.nested_scales),
                    _ptr(w.nested_quant_map),
                    w.nested_offset,
                    w.nested_blocksize,
                    w.quant_map.data_ptr(),
                    w.blocksize,
                )
                for w in weights
            )
        )
        self._address = ctypes.addressof(self._array)
        self._count = len(weights)
        self._flags = flags
        self._fn = build(flags).nf4_gemv_group

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The joint output; `out` (float32, contiguous, x's rows by out_features) is written
        instead of a new tensor when given and x is float32."""
        k = self.in_features
        if x.shape[-1] != k or not x.is_cpu:
            raise ValueError(f"nf4 gemv group: input {tuple(x.shape)} does not fit {k} columns")
        rows = x if x.dtype == torch.float32 and x.is_contiguous() else x.float().contiguous()
        shape = x.shape[:-1] + (self.out_features,)
        if out is None or x.dtype != torch.float32:
            out = torch.empty(shape, dtype=torch.float32)
        elif out.shape != shape or out.dtype != torch.float32 or not out.is_contiguous():
            raise ValueError(f"nf4 gemv group: out {tuple(out.shape)} does not fit {shape}")
        status = self._fn(
            rows.data_ptr(), rows.numel() // k, k, self._address, self._count, out.data_ptr()
        )
        if status != 0:
            raise ValueError("nf4 gemv group: the CPU kernel refused the weights")
        return out if x.dtype == torch.float32 else out.to(x.dtype)


class _Projection(ctypes.Structure):
    """cpu/nf4_gemv.cpp's nf4_decode_projection."""

    _fields_ = [
        ("group", ctypes.c_void_p),
        ("count", ctypes.c_int64),
        ("K", ctypes.c_int64),
        ("norm_weight", ctypes.c_void_p),
        ("eps", ctypes.c_float),
        ("y", ctypes.c_void_p),
        ("accumulate", ctypes.c_int64),
        ("rope_heads", ctypes.c_int64),
        ("kv_heads", ctypes.c_int64),
        ("head_dim", ctypes.c_int64),
        ("cos", ctypes.c_void_p),
        ("sin", ctypes.c_void_p),
        ("k_cache", ctypes.c_void_p),
        ("v_cache", ctypes.c_void_p),
        ("max_len", ctypes.c_int64),
    ]


class DecodeProjection:
    """One projection of a float32 decode step in one kernel call (nf4_decode_project): `y` (rows,
    width) = or += RMSNorm(x) @ W^T for a GemvGroup, then optionally RoPE on y's first `rope_heads`
    heads and the key/value heads written into a KV cache at the step's position. Every float op is
    the torch op's, rounded alike; only the order of the RMSNorm's sum of squares differs.

    `y`, the norm weight, the RoPE tables and the cache tensors must be contiguous float32 CPU
    tensors that stay where they are (the object holds them and passes their addresses)."""

    def __init__(
        self,
        group: GemvGroup,
        y: torch.Tensor,
        accumulate: bool,
        norm: tuple[torch.Tensor, float] | None = None,
        rope: tuple[torch.Tensor, torch.Tensor, int, int] | None = None,
        cache: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        held = (
            [y] + ([norm[0]] if norm else []) + list(rope[:2] if rope else []) + list(cache or [])
        )
        for t in held:
            if t.dtype != torch.float32 or not t.is_contiguous() or not t.is_cpu:
                raise ValueError("decode projection: tensors must be contiguous float32 on the CPU")
        if y.dim() != 2 or y.shape[1] != group.out_features:
            raise ValueError(f"decode projection: y {tuple(y.shape)} does not fit the group")
        self.rows, self._group, self._held = y.shape[0], group, held
        cos, sin, rope_heads, kv_heads = rope if rope else (None, None, 0, 0)
        head_dim = cos.shape[-1] if rope else 0
        if rope and (rope_heads + kv_heads) * head_dim > group.out_features:
            raise ValueError("decode projection: more RoPE and value heads than outputs")
        if cache and (not rope or cache[0].shape != (self.rows, kv_heads, cos.shape[0], head_dim)):
            raise ValueError("decode projection: the KV cache does not fit the RoPE heads")
        self._args = _Projection(
            group._address,
            group._count,
            group.in_features,
            _ptr(norm[0]) if norm else None,
            norm[1] if norm else 0.0,
            y.data_ptr(),
            int(accumulate),
            rope_heads,
            kv_heads,
            head_dim,
            _ptr(cos),
            _ptr(sin),
            _ptr(cache[0]) if cache else None,
            _ptr(cache[1]) if cache else None,
            cos.shape[0] if rope else 0,
        )
        self._address = ctypes.addressof(self._args)
        self._fn = build(group._flags).nf4_decode_project

    def __call__(self, x: torch.Tensor, position: int) -> None:
        """Run it on x (rows, in): contiguous float32, checked here."""
        if x.shape != (self.rows, self._group.in_features) or x.dtype != torch.float32:
            raise ValueError(f"decode projection: input {tuple(x.shape)} {x.dtype} does not fit")
        if not x.is_contiguous():
            raise ValueError("decode projection: the input must be contiguous")
        if self._fn(self._address, x.data_ptr(), self.rows, position) != 0:
            raise ValueError(f"decode projection: the kernel refused position {position}")
