"""What every NF4 op checks at its dispatch boundary, on both backends, whichever path then runs it:
a kernel indexes memory by the sizes it is given and would read past an input of the wrong width
where the reference raises. Each failure is one ValueError naming the op and the shapes or dtypes.
torch tensors and mlx arrays are read alike, by dtype name and shape."""

from __future__ import annotations

import math


def dtype_name(dtype: object) -> str:
    """ "float32" for torch.float32 and mlx.core.float32 alike."""
    return str(dtype).rsplit(".", 1)[-1]


def check_weight(op: str, w: object, weight_type: type, nested_codes: str) -> None:
    """`w` is a `weight_type` whose NF4 data have the format's dtypes and sizes; `nested_codes` is
    the name of its attribute holding the double-quantized block scales."""
    if not isinstance(w, weight_type):
        raise ValueError(f"nf4 {op}: the weight must be an NF4Weight, got {type(w).__name__}")
    if dtype_name(w.packed.dtype) != "uint8" or len(w.packed.shape) != 1:
        raise ValueError(
            f"nf4 {op}: packed codes must be 1-D uint8, got {dtype_name(w.packed.dtype)} "
            f"{tuple(w.packed.shape)}"
        )
    if dtype_name(w.quant_map.dtype) != "float32" or math.prod(w.quant_map.shape) != 16:
        raise ValueError(
            f"nf4 {op}: the code table must be 16 float32 values, got "
            f"{dtype_name(w.quant_map.dtype)} {tuple(w.quant_map.shape)}"
        )
    double = w.absmax is None
    scales = getattr(w, nested_codes) if double else w.absmax
    want = "uint8" if double else "float32"
    if scales is None or dtype_name(scales.dtype) != want:
        got = None if scales is None else dtype_name(scales.dtype)
        raise ValueError(f"nf4 {op}: block scales must be {want}, got {got}")


def check_matmul(op: str, x: object, w: object, width: int, floats: tuple[str, ...]) -> None:
    """x (..., width) of one of the `floats` dtypes; `width` is the weight dim x multiplies. The
    weight itself is checked by the caller (check_weight)."""
    if len(w.shape) != 2:
        raise ValueError(f"nf4 {op}: the weight must be 2-D (out, in), got shape {w.shape}")
    shape = getattr(x, "shape", ())
    if len(shape) == 0:
        raise ValueError(f"nf4 {op}: the input must be an array of at least 1 dim")
    if dtype_name(x.dtype) not in floats:
        raise ValueError(
            f"nf4 {op}: the input must be {_one_of(floats)}, got {dtype_name(x.dtype)}"
        )
    if shape[-1] != width:
        raise ValueError(
            f"nf4 {op}: input {tuple(shape)} does not fit weight {tuple(w.shape)} "
            f"(its last dim must be {width})"
        )


def check_dtype(op: str, dtype: object, floats: tuple[str, ...]) -> None:
    if dtype_name(dtype) not in floats:
        raise ValueError(
            f"nf4 {op}: the result dtype must be {_one_of(floats)}, got {dtype_name(dtype)}"
        )


def _one_of(names: tuple[str, ...]) -> str:
    return ", ".join(names[:-1]) + " or " + names[-1]
