"""Kernels prove themselves before auto mode trusts them (both backends share this verdict).

On its first use in auto mode, each kernel op (per path, op, dtype and device) runs once on a tiny
weight of its own next to its reference twin. If the kernel raises (it fails to compile or launch)
or disagrees, the verdict is "untrusted": one warning line, and from then on that op uses the
reference path. A kernel bug costs speed, never correctness. Verdicts are cached for the process;
a forced path never asks (the caller checks the mode). The backends build the inputs and call the
ops (backends/torch_backend/self_check.py, backends/mlx_backend/self_check.py); this module
compares, caches and warns.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable

import numpy as np

# rtol, and atol as a share of the largest |reference| output: the kernels' parity tests' tolerances.
RELATIVE_TOLERANCE = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}

Pairs = list[tuple[np.ndarray, np.ndarray]]  # (kernel, reference) outputs, upcast to float32
_verdicts: dict[tuple, bool] = {}


def dtype_name(dtype) -> str:
    """ "bfloat16" for torch.bfloat16 or mx.bfloat16."""
    return str(dtype).rsplit(".", 1)[-1]


def trusted(
    path: str, op: str, dtype, device: Hashable, run: Callable[[], Pairs], exact: bool
) -> bool:
    """Whether `path`'s `op` in `dtype` on `device` passed its self-check (run once, then cached).
    `run` returns the kernel's and the reference's outputs; `exact` asks for identical bits."""
    key = (path, op, dtype_name(dtype), device)
    if key not in _verdicts:
        _verdicts[key] = _check(path, op, dtype_name(dtype), run, exact)
    return _verdicts[key]


def reset() -> None:
    """Forget every verdict (tests; a new kernel source)."""
    _verdicts.clear()


def _check(path: str, op: str, dtype: str, run: Callable[[], Pairs], exact: bool) -> bool:
    what = f"{path} {op} kernel ({dtype})"
    try:
        pairs = run()
    except Exception as exc:  # noqa: BLE001 - any failure of the kernel means: do not trust it
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        _warn(f"{what} failed on a self-check ({type(exc).__name__}: {reason})")
        return False
    for got, want in pairs:
        problem = _disagreement(got, want, dtype, exact)
        if problem:
            _warn(f"{what} disagrees with the reference on a self-check ({problem})")
            return False
    return True


def _disagreement(got: np.ndarray, want: np.ndarray, dtype: str, exact: bool) -> str | None:
    """None when `got` matches `want` (bit for bit, or within the dtype's tolerance), else why."""
    if got.shape != want.shape:
        return f"shape {got.shape} instead of {want.shape}"
    got, want = got.astype(np.float32), want.astype(np.float32)
    if exact:
        if np.array_equal(got.view(np.uint32), want.view(np.uint32)):
            return None
    elif np.isfinite(got).all():  # the parity tests' allclose(rtol=tol, atol=tol * max |want|)
        tol = RELATIVE_TOLERANCE.get(dtype, RELATIVE_TOLERANCE["float32"])
        limit = tol * np.abs(want).max(initial=0.0) + tol * np.abs(want)
        if (np.abs(got - want) <= limit).all():
            return None
    with np.errstate(invalid="ignore"):
        diff = np.nan_to_num(np.abs(got - want), nan=np.inf).max(initial=0.0)
    return f"max |diff| {diff:.3g}"


def _warn(message: str) -> None:
    warnings.warn(f"{message}; using the reference path", RuntimeWarning, stacklevel=5)
