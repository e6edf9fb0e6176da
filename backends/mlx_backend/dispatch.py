"""Picks the Metal kernel or the plain-mlx reference for each op when it is called (never at import).

Auto: Metal when `mx.metal.is_available()` and the default device is the GPU, else the reference;
a Metal op is used only after it passed its self-check (self_check.py), else the reference runs.
Force a path for a block of code with `force_path("reference")` / `force_path("metal")`, or for the
process with the environment variable NF4_KERNELS=auto|metal|reference (NF4_MLX_KERNELS is its
deprecated name).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

from ..registry import kernels_from_env
from . import ops_reference, self_check
from ._mlx import mx
from .nf4_weight import NF4Weight
from .op_checks import check_dtype, check_matmul, check_weight

PATHS = ("auto", "metal", "reference")
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("nf4_mlx_path", default=None)


def metal_usable() -> bool:
    """True when Metal kernels can run now: a Metal device that is also the default device."""
    return bool(mx.metal.is_available()) and mx.default_device() == mx.gpu


def default_compute_dtype() -> str:
    """ "bfloat16" on a Metal GPU, "float32" on the CPU (most CPUs run bfloat16 matmuls slowly)."""
    return "bfloat16" if metal_usable() else "float32"


def requested_path() -> str:
    return _forced.get() or kernels_from_env("mlx", PATHS)


def selected_path() -> str:
    """ "metal" or "reference" for an op called now; RuntimeError if Metal is forced but absent."""
    path = requested_path()
    if path == "reference":
        return path
    usable = metal_usable()
    if path == "metal" and not usable:
        raise RuntimeError(
            "the Metal kernels were requested, but no Metal device is the default device "
            f"(mx.metal.is_available() = {mx.metal.is_available()}, default = {mx.default_device()})"
        )
    return "metal" if usable else "reference"


@contextlib.contextmanager
def force_path(path: str) -> Iterator[None]:
    """Force "metal", "reference" or "auto" for the ops called inside the block."""
    if path not in PATHS:
        raise ValueError(f"unknown kernel path {path!r}; expected one of {PATHS}")
    token = _forced.set(path)
    try:
        yield
    finally:
        _forced.reset(token)


def _ops(op: str, dtype: mx.Dtype):
    """The Metal ops, or the reference: when forced, when no Metal device is the default, or (in
    auto mode) when the kernels of `op` in `dtype` failed their self-check (self_check.py)."""
    if selected_path() == "metal":
        if requested_path() == "auto" and not self_check.trusted(op, dtype):
            return ops_reference
        from . import ops_metal

        return ops_metal
    return ops_reference


# Every op is checked first (op_checks.py), so each path refuses the same bad input alike.
def reconstruct_absmax(w: NF4Weight) -> mx.array:
    check_weight("reconstruct_absmax", w)
    return _ops("dequantize", mx.float32).reconstruct_absmax(w)


def dequantize(w: NF4Weight, dtype: mx.Dtype = mx.float32) -> mx.array:
    check_weight("dequantize", w)
    check_dtype("dequantize", dtype)
    return _ops("dequantize", dtype).dequantize(w, dtype)


def linear(x: mx.array, w: NF4Weight) -> mx.array:
    """x @ W^T: (..., in) -> (..., out)."""
    check_matmul("linear", x, w, w.shape[-1])
    return _ops("linear", x.dtype).linear(x, w)


def linear_grad_input(g: mx.array, w: NF4Weight) -> mx.array:
    """g @ W: (..., out) -> (..., in)."""
    check_matmul("linear_grad_input", g, w, w.shape[0])
    return _ops("linear_grad_input", g.dtype).linear_grad_input(g, w)
