"""Launchers of the Triton kernels in `cuda/` for `NF4Weight` (same signatures as ops_reference).

Importing this module imports neither triton nor the kernels; the first call does.
"""

from __future__ import annotations

import os
import warnings

import torch

from . import autotune, launch_config, ops_reference
from .kernels import load_kernel_module
from .launch_config import GEMV_MAX_ROWS
from .nf4_weight import NF4Weight

# Compiler options of the double-quant absmax kernel on GPUs: multiply and add stay two roundings
# (tests/backends/torch_backend/test_triton_aot.py checks the PTX has no fma).
ABSMAX_COMPILE_OPTIONS = {"enable_fp_fusion": False}
_ELEMENTS_PER_PROGRAM = 1024


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _while_loop() -> bool:
    """The kernels' K loop as a while loop: only under the interpreter (see nf4_matmul_kernel)."""
    return _interpreting()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def block_absmax(w: NF4Weight) -> torch.Tensor:
    """float32 (n_blocks,); multiply and add rounded separately (no FMA), bit-exact with nf4core."""
    if w.absmax is not None:
        return w.absmax
    kernels = load_kernel_module("nf4_kernels.py")
    out = torch.empty(w.n_blocks, dtype=torch.float32, device=w.device)
    extra = {} if _interpreting() else ABSMAX_COMPILE_OPTIONS
    grid = (_cdiv(w.n_blocks, _ELEMENTS_PER_PROGRAM),)
    kernels.nf4_absmax_kernel[grid](
        w.nested_codes,
        w.nested_scales,
        w.nested_quant_map,
        w.nested_offset,
        out,
        w.n_blocks,
        NESTED_BLOCKSIZE=w.nested_blocksize,
        BLOCK=_ELEMENTS_PER_PROGRAM,
        **extra,
    )
    return out


def dequantize(w: NF4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    kernels = load_kernel_module("nf4_kernels.py")
    absmax = block_absmax(w)
    out = torch.empty(w.numel, dtype=dtype, device=w.device)
    grid = (_cdiv(w.numel, _ELEMENTS_PER_PROGRAM),)
    kernels.nf4_dequant_kernel[grid](
        w.packed,
        absmax,
        w.quant_map,
        out,
        w.numel,
        BLOCKSIZE=w.blocksize,
        BLOCK=_ELEMENTS_PER_PROGRAM,
    )
    return out.reshape(w.shape)


def _capability(t: torch.Tensor) -> tuple[int, int] | None:
    """(major, minor) of t's GPU; None on the CPU (the interpreter runs its own small tiles)."""
    return torch.cuda.get_device_capability(t.device) if t.device.type == "cuda" else None


_does_not_fit: set[tuple] = set()  # (kernel, capability, dtype, config) that ran out of resources
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _launch(
    kernel, grid_of, args: tuple, constants: dict, configs: tuple, what: str, key: tuple
) -> bool:
    """Launch `kernel` with the first configuration the GPU can hold; after an OutOfResources try
    the next (smaller) one, and remember the failure. False when none fits: the caller then runs
    the reference path. One warning line per fallback."""
    from triton.runtime.errors import OutOfResources

    errors = []
    for config in configs:
        if (*key, config) in _does_not_fit:
            continue
        extra = {} if _interpreting() else config.options()
        try:
            kernel[grid_of(config)](*args, **constants, **config.tiles(), **extra)
        except OutOfResources as exc:
            _does_not_fit.add((*key, config))
            errors.append(f"{config} ({exc})")
            continue
        if errors:
            _warn_once(f"nf4 {what}: {'; '.join(errors)} does not fit this GPU; using {config}")
        return True
    if errors:
        _warn_once(
            f"nf4 {what}: no tile fits this GPU: {'; '.join(errors)}; "
            f"using the torch reference path"
        )
    return False


def _chosen(
    kernel, grid_of, args: tuple, constants: dict, candidates: tuple, key: tuple, device
) -> tuple:
    """The configuration to launch (the autotuned one, else the first candidate), then the smallest
    candidate as the fallback after an OutOfResources."""
    first = candidates[0]
    if len(candidates) > 1 and autotune.enabled(device):
        tuner = autotune.tuner(device)
        first = tuner.chosen.get(key)
        if first is None:
            first = tuner.chosen[key] = _tune(
                tuner, kernel, grid_of, args, constants, candidates, key
            )
    return (first,) if first == candidates[-1] else (first, candidates[-1])


def _tune(tuner, kernel, grid_of, args: tuple, constants: dict, candidates: tuple, key: tuple):
    from triton.runtime.errors import OutOfResources

    def run(config) -> None:
        extra = {} if _interpreting() else config.options()
        kernel[grid_of(config)](*args, **constants, **config.tiles(), **extra)

    tag = "|".join(map(str, (*key, tuner.device_name)))
    return tuner.choose(tag, candidates, run, skip=(OutOfResources,))


def _matmul(a: torch.Tensor, w: NF4Weight, transposed: bool) -> torch.Tensor:
    """(M, R) @ W^T (transposed) or @ W; W's shape (N, R) or (R, N)."""
    kernels = load_kernel_module("nf4_kernels.py")
    out_rows, in_cols = w.shape
    n = out_rows if transposed else in_cols
    m, r = a.shape
    c = torch.empty(m, n, dtype=a.dtype, device=a.device)
    if m == 0:
        return c
    capability = _capability(a)
    if capability is None and _interpreting():
        candidates = launch_config.INTERPRETER_MATMUL
    else:
        candidates = launch_config.matmul_configs(capability, a.element_size(), m)
    args = (
        a,
        w.packed,
        block_absmax(w),
        w.quant_map,
        c,
        m,
        n,
        r,
        a.stride(0),
        a.stride(1),
        c.stride(0),
        c.stride(1),
        in_cols,
    )
    constants = dict(
        BLOCKSIZE=w.blocksize,
        W_TRANSPOSED=transposed,
        DOT_FP32=_interpreting() and a.dtype == torch.bfloat16,
        PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        WHILE_LOOP=_while_loop(),
    )
    grid_of = lambda cfg: (_cdiv(m, cfg.BM), _cdiv(n, cfg.BN))  # noqa: E731
    what = "forward matmul" if transposed else "input-gradient matmul"
    key = (what, capability, a.dtype)
    shape = (*key, f"m{autotune.row_class(m)}", f"n{n}", f"r{r}", f"bs{w.blocksize}")
    kernel = kernels.nf4_matmul_kernel
    configs = _chosen(kernel, grid_of, args, constants, candidates, shape, a.device)
    if _launch(kernel, grid_of, args, constants, configs, what, key):
        return c
    dense = ops_reference.dequantize(w, a.dtype)
    return a @ dense.t() if transposed else a @ dense


def gemv(x2d: torch.Tensor, w: NF4Weight) -> torch.Tensor:
    """x (M, K) @ W^T for small M with the GEMV kernel -> (M, N)."""
    kernels = load_kernel_module("nf4_kernels.py")
    n, k = w.shape
    m = x2d.shape[0]
    x2d = x2d if x2d.stride(1) == 1 else x2d.contiguous()
    y = torch.empty(m, n, dtype=x2d.dtype, device=x2d.device)
    if m == 0:
        return y
    capability = _capability(x2d)
    if capability is None and _interpreting():
        candidates = launch_config.INTERPRETER_GEMV
    else:
        candidates = launch_config.gemv_configs(capability)
    args = (x2d, w.packed, block_absmax(w), w.quant_map, y, n, k, x2d.stride(0), y.stride(0))
    constants = dict(BLOCKSIZE=w.blocksize, WHILE_LOOP=_while_loop())
    grid_of = lambda cfg: (_cdiv(n, cfg.BN), m)  # noqa: E731
    key = ("GEMV", capability, x2d.dtype)
    shape = (*key, f"m{m}", f"n{n}", f"k{k}", f"bs{w.blocksize}")
    kernel = kernels.nf4_gemv_kernel
    config = _chosen(kernel, grid_of, args, constants, candidates, shape, x2d.device)[0]
    if _launch(kernel, grid_of, args, constants, (config,), "GEMV", key):
        return y
    return x2d @ ops_reference.dequantize(w, x2d.dtype).t()


def linear(x: torch.Tensor, w: NF4Weight) -> torch.Tensor:
    """x (..., in) @ W^T -> (..., out)."""
    x2d = x.reshape(-1, x.shape[-1])
    if x2d.shape[0] <= GEMV_MAX_ROWS:
        y = gemv(x2d, w)
    else:
        y = _matmul(x2d, w, transposed=True)
    return y.reshape(*x.shape[:-1], w.shape[0])


def linear_grad_input(grad_out: torch.Tensor, w: NF4Weight) -> torch.Tensor:
    """dY (..., out) @ W -> (..., in)."""
    g2d = grad_out.reshape(-1, grad_out.shape[-1])
    return _matmul(g2d, w, transposed=False).reshape(*grad_out.shape[:-1], w.shape[1])
