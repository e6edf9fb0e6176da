"""Names of the floating dtypes the format stores and computes in (bfloat16 comes from ml_dtypes)."""

from __future__ import annotations

import ml_dtypes
import numpy as np

bfloat16 = np.dtype(ml_dtypes.bfloat16)

FLOAT_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": bfloat16,
}


def float_dtype(dtype: object) -> np.dtype:
    """The numpy dtype for a name ("bfloat16") or dtype-like; TypeError for anything else."""
    if isinstance(dtype, str):
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"unsupported dtype {dtype!r}; expected one of {sorted(FLOAT_DTYPES)}")
        return FLOAT_DTYPES[dtype]
    try:
        resolved = np.dtype(dtype)
    except TypeError as exc:
        raise TypeError(f"not a dtype: {dtype!r}") from exc
    name = dtype_name(resolved)
    return FLOAT_DTYPES[name]


def dtype_name(dtype: np.dtype) -> str:
    """ "float32", "float16" or "bfloat16"; TypeError for any other dtype."""
    for name, candidate in FLOAT_DTYPES.items():
        if dtype == candidate:
            return name
    raise TypeError(
        f"unsupported dtype {dtype}; NF4 stores weights given as float32, float16 or bfloat16"
    )
