"""The op-boundary checks (backends/op_checks.py) for torch tensors, called from ops.py, plus the one
torch adds: every operand on one device (the host path reads CPU memory only)."""

from __future__ import annotations

import torch

from .. import op_checks
from .nf4_weight import NF4Weight

FLOATS = ("float32", "float16", "bfloat16", "float64")


def check_weight(op: str, w: NF4Weight) -> None:
    op_checks.check_weight(op, w, NF4Weight, "nested_codes")
    for t in w.tensors():
        if t.device != w.packed.device:
            raise ValueError(
                f"nf4 {op}: the weight's tensors lie on {w.packed.device} and {t.device}"
            )


def check_matmul(op: str, x: torch.Tensor, w: NF4Weight, width: int) -> None:
    check_weight(op, w)
    op_checks.check_matmul(op, x, w, width, FLOATS)
    if x.device != w.packed.device:
        raise ValueError(f"nf4 {op}: the input is on {x.device}, the weight on {w.packed.device}")


def check_dtype(op: str, dtype: torch.dtype) -> None:
    op_checks.check_dtype(op, dtype, FLOATS)
