"""The Metal kernels of metal/*.metal as mlx ops (built once per kernel with mx.fast.metal_kernel).

Only called on a Metal device (see dispatch.py). Each op has a twin in ops_reference.py.
"""

from __future__ import annotations

import dataclasses
import functools
import os

from ._mlx import mx
from .metal_sources import KERNELS, load_source
from .nf4_weight import NF4Weight

GEMV_MAX_ROWS = 8  # rows of x up to which the matrix-vector kernel is used
FUSED_MAX_ROWS = 64  # above this, "auto" dequantizes (kernel) and uses MLX's tuned GEMM
STRATEGIES = ("auto", "fused", "dequant")
_GROUP = 256


@functools.cache
def _kernel(name: str):
    spec = KERNELS[name]
    args = {
        "name": name,
        "input_names": spec.input_names,
        "output_names": spec.output_names,
        "source": load_source(name),
    }
    try:  # IEEE arithmetic, no fast-math rewrites (mlx >= 0.29 takes compile_options)
        return mx.fast.metal_kernel(**args, compile_options={"math_mode": "safe"})
    except TypeError:
        return mx.fast.metal_kernel(**args)


def _dims(*values: int) -> mx.array:
    return mx.array(values, dtype=mx.uint32)


def _run(name, inputs, template, grid, shape, dtype):
    group = (min(_GROUP, grid[0]), max(1, min(_GROUP // min(_GROUP, grid[0]), grid[1])), 1)
    extra = {"template": template} if template else {}
    return _kernel(name)(
        inputs=inputs,
        grid=grid,
        threadgroup=group,
        output_shapes=[shape],
        output_dtypes=[dtype],
        **extra,
    )[0]


def reconstruct_absmax(w: NF4Weight) -> mx.array:
    """float32 (n_blocks,): multiply in one launch, add the offset in another (no FMA possible)."""
    if w.absmax is not None:
        return w.absmax
    n = w.n_blocks
    if n == 0:  # no dispatch for an empty grid (Metal refuses zero-sized grids and threadgroups)
        return mx.zeros((0,), dtype=mx.float32)
    scaled = _run(
        "nf4_absmax_scale",
        [w.dq_codes, w.dq_scales, w.dq_quant_map, _dims(n)],
        [("DQ_BS", w.dq_blocksize)],
        (n, 1, 1),
        (n,),
        mx.float32,
    )
    offset = mx.array([w.dq_offset], dtype=mx.float32)
    return _run("nf4_absmax_offset", [scaled, offset, _dims(n)], [], (n, 1, 1), (n,), mx.float32)


def _after(w: NF4Weight, x: mx.array) -> NF4Weight:
    """`w` whose packed codes wait for x (one dequantized weight alive at a time; ops_reference)."""
    return dataclasses.replace(w, packed=mx.depends(w.packed, x))


def dequantize(w: NF4Weight, dtype: mx.Dtype = mx.float32, absmax: mx.array | None = None):
    if w.numel == 0:
        return mx.zeros(w.shape, dtype=dtype)
    absmax = reconstruct_absmax(w) if absmax is None else absmax
    out = _run(
        "nf4_dequant",
        [w.packed, absmax, w.quant_map, _dims(w.numel)],
        [("T", dtype), ("BS", w.blocksize)],
        ((w.numel + 1) // 2, 1, 1),
        (w.numel,),
        dtype,
    )
    return out.reshape(w.shape)


def _strategy(strategy: str, m: int) -> str:
    """ "fused" or "dequant" for M rows; NF4_MLX_FUSED_MAX_ROWS overrides the threshold (tune it
    with the table bench/metal_check.py prints)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
    if strategy == "auto":
        limit = int(os.environ.get("NF4_MLX_FUSED_MAX_ROWS", FUSED_MAX_ROWS))
        return "fused" if m <= limit else "dequant"
    return strategy


def linear(
    x: mx.array, w: NF4Weight, absmax: mx.array | None = None, strategy: str = "auto"
) -> mx.array:
    """x @ W^T, x (..., K), W (N, K): GEMV kernel up to 8 rows, the fused kernel up to 64, then
    (by default) the dequantize kernel and MLX's GEMM. Note (trade-off): the fused kernels are one
    thread per output, simple and checked by the shim, but not tiled; a large batch is compute-bound,
    where MLX's tuned GEMM on a transient dequantized weight wins. bench/metal_check.py measures both.
    """
    n, k = w.shape
    lead = x.shape[:-1]
    if x.size == 0 or n == 0 or k == 0:  # an empty batch or weight: nothing to dispatch
        return mx.zeros((*lead, n), dtype=x.dtype)
    absmax = reconstruct_absmax(w) if absmax is None else absmax
    x2 = x.reshape(-1, k)  # (M, K)
    m = x2.shape[0]
    if _strategy(strategy, m) == "dequant":
        return x @ dequantize(_after(w, x), x.dtype, absmax).T
    inputs = [x2, w.packed, absmax, w.quant_map, _dims(m, n, k)]
    if m <= GEMV_MAX_ROWS:
        template = [("T", x.dtype), ("BS", w.blocksize), ("ROWS", GEMV_MAX_ROWS)]
        y = _run("nf4_gemv", inputs, template, (n, 1, 1), (m, n), x.dtype)
    else:
        template = [("T", x.dtype), ("BS", w.blocksize)]
        y = _run("nf4_matmul", inputs, template, (n, m, 1), (m, n), x.dtype)
    return y.reshape(*lead, n)


def linear_grad_input(
    g: mx.array, w: NF4Weight, absmax: mx.array | None = None, strategy: str = "auto"
) -> mx.array:
    """g @ W, g (..., N), W (N, K): the input gradient of `linear` (same strategies)."""
    n, k = w.shape
    lead = g.shape[:-1]
    if g.size == 0 or n == 0 or k == 0:  # an empty batch or weight: nothing to dispatch
        return mx.zeros((*lead, k), dtype=g.dtype)
    absmax = reconstruct_absmax(w) if absmax is None else absmax
    g2 = g.reshape(-1, n)  # (M, N)
    m = g2.shape[0]
    if _strategy(strategy, m) == "dequant":
        return g @ dequantize(_after(w, g), g.dtype, absmax)
    inputs = [g2, w.packed, absmax, w.quant_map, _dims(m, n, k)]
    dx = _run(
        "nf4_matmul_t", inputs, [("T", g.dtype), ("BS", w.blocksize)], (k, m, 1), (m, k), g.dtype
    )
    return dx.reshape(*lead, k)
