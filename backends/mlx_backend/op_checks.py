"""The op-boundary checks (backends/op_checks.py) for mlx arrays, called from dispatch.py."""

from __future__ import annotations

from .. import op_checks
from ._mlx import mx
from .nf4_weight import NF4Weight

FLOATS = ("float32", "float16", "bfloat16")


def check_weight(op: str, w: NF4Weight) -> None:
    op_checks.check_weight(op, w, NF4Weight, "dq_codes")


def check_matmul(op: str, x: mx.array, w: NF4Weight, width: int) -> None:
    check_weight(op, w)
    op_checks.check_matmul(op, x, w, width, FLOATS)


def check_dtype(op: str, dtype: mx.Dtype) -> None:
    op_checks.check_dtype(op, dtype, FLOATS)
