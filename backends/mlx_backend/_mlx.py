"""The one place that imports mlx, with a message that says how to get it."""

from __future__ import annotations

from nf4core.dtypes import FLOAT_DTYPES

try:
    import mlx.core as mx
    from mlx import nn
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "the MLX backend needs mlx: pip install 'nf4-qlora[mlx]' "
        "(on Linux this installs mlx[cpu], which runs on the CPU)"
    ) from exc

DTYPES = {name: getattr(mx, name) for name in FLOAT_DTYPES}  # "bfloat16" -> mx.bfloat16


def mx_dtype(dtype: object) -> mx.Dtype:
    """An mlx float dtype from a name ("bfloat16") or an mlx dtype."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise TypeError(f"unsupported dtype {dtype!r}; expected one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    if dtype in DTYPES.values():
        return dtype
    raise TypeError(f"unsupported dtype {dtype!r}; expected float32, float16 or bfloat16")


def dtype_name(dtype: mx.Dtype) -> str:
    for name, candidate in DTYPES.items():
        if candidate == dtype:
            return name
    raise TypeError(f"unsupported dtype {dtype}")


__all__ = ["DTYPES", "dtype_name", "mx", "mx_dtype", "nn"]
