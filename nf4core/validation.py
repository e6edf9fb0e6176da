"""Checks of user-supplied weights and parameters, with messages that name the problem."""

from __future__ import annotations

import numpy as np

from .blockwise import ALLOWED_BLOCKSIZES
from .dtypes import dtype_name


def check_blocksize(blocksize: object, what: str = "blocksize") -> int:
    if isinstance(blocksize, bool) or not isinstance(blocksize, (int, np.integer)):
        raise TypeError(f"{what} must be an int, got {type(blocksize).__name__}")
    if int(blocksize) not in ALLOWED_BLOCKSIZES:
        raise ValueError(
            f"{what} {blocksize} is not allowed; bitsandbytes accepts {list(ALLOWED_BLOCKSIZES)}"
        )
    return int(blocksize)


def as_weight_array(w: object) -> tuple[np.ndarray, str]:
    """The weights as a flat float32 array (C order) and the name of their original dtype."""
    if not isinstance(w, np.ndarray):
        if not hasattr(w, "__array__") and not isinstance(w, (list, tuple)):
            raise TypeError(f"weights must be an array, got {type(w).__name__}")
        w = np.asarray(w)
        if w.dtype == np.float64:  # plain Python floats: nothing was lost by taking them as float32
            w = w.astype(np.float32)
    if w.dtype == np.float64:
        raise TypeError(
            "float64 weights are not a storage dtype of the format; cast them first, "
            "e.g. w.astype(np.float32)"
        )
    if w.dtype.kind != "f" and w.dtype.name != "bfloat16":
        raise TypeError(
            f"weights must be float32, float16 or bfloat16, got {w.dtype} "
            "(integer and boolean arrays are not weights)"
        )
    name = dtype_name(w.dtype)
    if w.ndim == 0:
        raise ValueError("weights must have at least one dimension, got a scalar")
    if w.size == 0:
        raise ValueError(f"weights are empty (shape {w.shape}); there is nothing to quantize")
    return np.ascontiguousarray(w, dtype=np.float32).reshape(-1), name


def non_finite_error(flat: np.ndarray, shape: tuple[int, ...]) -> ValueError:
    """A ValueError that counts the NaN and Inf values and says where the first one is."""
    nan = np.isnan(flat)
    inf = np.isinf(flat)
    first = int(np.flatnonzero(nan | inf)[0])
    where = tuple(int(i) for i in np.unravel_index(first, shape))
    return ValueError(
        f"weights contain {int(nan.sum())} NaN and {int(inf.sum())} Inf values "
        f"(first at index {where}, value {flat[first]}); NF4 cannot represent them"
    )
