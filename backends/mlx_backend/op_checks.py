"""What every NF4 op checks at the dispatch boundary (dispatch.py), whichever path then runs it: a
Metal kernel indexes memory by the sizes it is given and would read past an input of the wrong width
where the reference raises. Each failure is one ValueError naming the op and the shapes or dtypes."""

from __future__ import annotations

from ._mlx import mx
from .nf4_weight import NF4Weight

FLOAT_DTYPES = (mx.float32, mx.float16, mx.bfloat16)


def check_weight(op: str, w: NF4Weight) -> None:
    """The NF4 data have their format's dtypes and sizes."""
    if not isinstance(w, NF4Weight):
        raise ValueError(f"nf4 {op}: the weight must be an NF4Weight, got {type(w).__name__}")
    if w.packed.dtype != mx.uint8 or w.packed.ndim != 1:
        raise ValueError(
            f"nf4 {op}: packed codes must be 1-d uint8, got {w.packed.dtype} {tuple(w.packed.shape)}"
        )
    if w.quant_map.dtype != mx.float32 or w.quant_map.size != 16:
        raise ValueError(
            f"nf4 {op}: the code table must be 16 float32 values, got {w.quant_map.dtype} "
            f"{tuple(w.quant_map.shape)}"
        )
    scales, want = (w.absmax, mx.float32) if w.absmax is not None else (w.dq_codes, mx.uint8)
    if scales is None or scales.dtype != want:
        raise ValueError(
            f"nf4 {op}: block scales must be {want}, got {None if scales is None else scales.dtype}"
        )


def check_matmul(op: str, x: mx.array, w: NF4Weight, width: int) -> None:
    """x (..., width) of a float dtype; `width` is the weight dim x multiplies."""
    check_weight(op, w)
    if len(w.shape) != 2:
        raise ValueError(f"nf4 {op}: the weight must be 2-d (out, in), got shape {w.shape}")
    if not isinstance(x, mx.array) or x.ndim == 0:
        raise ValueError(f"nf4 {op}: the input must be an mx.array of at least 1 dim")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"nf4 {op}: the input must be float32, float16 or bfloat16, got {x.dtype}")
    if x.shape[-1] != width:
        raise ValueError(
            f"nf4 {op}: input {tuple(x.shape)} does not fit weight {tuple(w.shape)} "
            f"(its last dim must be {width})"
        )


def check_dtype(op: str, dtype: mx.Dtype) -> None:
    if dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"nf4 {op}: the result dtype must be float32, float16 or bfloat16, got {dtype}"
        )
