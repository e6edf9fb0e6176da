"""Which implementation an op uses, decided per call: the Triton kernels, the CPU GEMV kernel
(cpu_gemv.py) or the torch reference.

`auto` (default) takes the Triton kernels for CUDA tensors when triton is importable, and the CPU GEMV
for CPU linears of few rows. The environment variable NF4_KERNELS (auto | reference | triton | cpu;
NF4_QLORA_KERNELS is its deprecated name) or the `force_path` context manager overrides it; `triton`
on CPU tensors needs TRITON_INTERPRET=1 (the interpreter runs the kernel source); `cpu` runs every
CPU linear through the GEMV kernel (any row count) and the other ops on the reference.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator

import torch

from ..registry import kernels_from_env

PATHS = ("auto", "reference", "triton", "cpu")
# Device types on which auto mode takes the Triton kernels (tests add "cpu" to run the interpreter
# as auto mode would on a GPU).
AUTO_TRITON_DEVICES = ("cuda",)
_forced: list[str] = []


def requested() -> str:
    """The path asked for now: the innermost `force_path`, else NF4_KERNELS, else "auto"."""
    return _forced[-1] if _forced else kernels_from_env("torch", PATHS)


def triton_available() -> bool:
    """Whether triton can be imported (checked without importing it)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # e.g. sys.modules["triton"] is None
        return False


def use_triton(t: torch.Tensor) -> bool:
    """True when an op on tensor `t` should run the Triton kernel."""
    path = requested()
    if path in ("reference", "cpu"):
        return False
    if path == "triton":
        if not triton_available():
            raise RuntimeError("the triton kernels were requested, but triton is not installed")
        return True
    return t.device.type in AUTO_TRITON_DEVICES and triton_available()


def auto_mode() -> bool:
    """True when neither the environment nor `force_path` forces a path (kernels self-check)."""
    return requested() == "auto"


def use_host(t: torch.Tensor) -> bool:
    """True when an op on CPU tensor `t` should use nf4core's numpy decoder (auto path only)."""
    return auto_mode() and t.device.type == "cpu"


@contextlib.contextmanager
def force_path(path: str) -> Iterator[None]:
    """Force `reference`, `triton`, `cpu` or `auto` inside the block (nests; thread-unsafe by design)."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    _forced.append(path)
    try:
        yield
    finally:
        _forced.pop()
