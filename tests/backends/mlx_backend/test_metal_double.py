"""ops_metal end to end on Linux through the Metal double (metal_double.py): the very wiring (input
names, templates, grids, threadgroups, output shapes) that runs on a Mac, compiled through the shim.
Dequantize is bit-exact with the reference ops; the matmuls agree within each dtype's tolerance;
the double refuses what MLX/Metal refuse; empty batches dispatch nothing."""

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

import nf4core  # noqa: E402
from backends.mlx_backend import ops_metal, ops_reference  # noqa: E402
from backends.mlx_backend.nf4_weight import NF4Weight  # noqa: E402

from . import metal_double  # noqa: E402
from .shim_driver import have_compiler  # noqa: E402

pytestmark = pytest.mark.skipif(not have_compiler(), reason="needs g++ for the Metal double")
DTYPES = {mx.float32: 1e-5, mx.float16: 2e-3, mx.bfloat16: 1.6e-2}  # of max |reference|


@pytest.fixture
def doubled(monkeypatch):
    """mx.fast.metal_kernel replaced by the double; every kernel made records its calls."""
    made = []

    def make(**kwargs):
        made.append(metal_double.metal_kernel(**kwargs))
        return made[-1]

    ops_metal._kernel.cache_clear()
    monkeypatch.setattr(mx.fast, "metal_kernel", make)
    yield made
    ops_metal._kernel.cache_clear()


def _calls(made) -> list:
    return [call for kernel in made for call in kernel.calls]


@pytest.fixture(scope="module")
def weight():
    w = np.random.default_rng(3).standard_normal((37, 129)).astype(np.float32) * 2
    t = nf4core.quantize(w, blocksize=64, double_quant=True)
    return t, NF4Weight.from_nf4(t)


def _bits(a: mx.array) -> np.ndarray:
    wide = a.dtype not in (mx.bfloat16, mx.float16)
    return np.array(a.view(mx.uint32) if wide else a.view(mx.uint16))


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_dequantize_bit_exact(doubled, weight, dtype):
    t, w = weight
    absmax = ops_metal.reconstruct_absmax(w)
    assert np.array_equal(np.array(absmax).view(np.uint32), t.block_absmax().view(np.uint32))
    got = ops_metal.dequantize(w, dtype)
    want = ops_reference.dequantize(w, dtype)
    assert got.dtype == dtype and got.shape == want.shape
    assert np.array_equal(_bits(got), _bits(want))


def _close(got, want, dtype):
    got32, want32 = np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32))
    assert got.dtype == dtype and got.shape == want.shape
    assert np.abs(got32 - want32).max() <= DTYPES[dtype] * np.abs(want32).max()


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("m,strategy", [(3, "auto"), (9, "fused"), (70, "auto")])
def test_matmuls_match_the_reference(doubled, weight, dtype, m, strategy):
    """GEMV (3 rows), the fused kernels (9 rows), dequantize + MLX's matmul (70 rows)."""
    _, w = weight
    rng = np.random.default_rng(m)
    x = mx.array(rng.standard_normal((m, 129)).astype(np.float32)).astype(dtype)
    g = mx.array(rng.standard_normal((m, 37)).astype(np.float32)).astype(dtype)
    _close(ops_metal.linear(x, w, strategy=strategy), ops_reference.linear(x, w), dtype)
    _close(
        ops_metal.linear_grad_input(g, w, strategy=strategy),
        ops_reference.linear_grad_input(g, w),
        dtype,
    )
    assert _calls(doubled)  # the kernels really ran through the double


def test_double_detects_a_wrong_kernel(doubled, weight, monkeypatch):
    """Control: the comparison fails for a body with the nibbles read in the wrong order."""
    t, w = weight
    original = ops_metal.load_source
    swapped = original("nf4_dequant").replace("bits >> 4", "bits & 15 ")
    monkeypatch.setattr(
        ops_metal, "load_source", lambda name: swapped if name == "nf4_dequant" else original(name)
    )
    got = ops_metal.dequantize(w, mx.float32)
    assert not np.array_equal(np.array(got), np.array(ops_reference.dequantize(w, mx.float32)))


def test_empty_batches_dispatch_nothing(doubled, weight):
    _, w = weight
    for dtype in (mx.float32, mx.bfloat16):
        assert ops_metal.linear(mx.zeros((0, 129), dtype=dtype), w).shape == (0, 37)
        assert ops_metal.linear(mx.zeros((2, 0, 129), dtype=dtype), w).shape == (2, 0, 37)
        fused = ops_metal.linear(mx.zeros((0, 129), dtype=dtype), w, strategy="fused")
        assert fused.shape == (0, 37) and fused.dtype == dtype
        assert ops_metal.linear_grad_input(mx.zeros((0, 37), dtype=dtype), w).shape == (0, 129)
        fused_t = ops_metal.linear_grad_input(mx.zeros((0, 37), dtype=dtype), w, strategy="fused")
        assert fused_t.shape == (0, 129)
    # (nf4core refuses to quantize an empty weight, so W always has elements)
    assert _calls(doubled) == []


_COPY = "uint i = thread_position_in_grid.x; if (i < n[0]) { out[i] = inp[i] * T(2); }"


def _copy_kernel(**overrides):
    args = dict(name="copy2", input_names=["inp", "n"], output_names=["out"], source=_COPY)
    return metal_double.metal_kernel(**{**args, **overrides})


def _run_copy(kernel, **overrides):
    x = mx.arange(10, dtype=mx.float32)
    call = dict(
        inputs=[x, mx.array([10], dtype=mx.uint32)],
        grid=(10, 1, 1),
        threadgroup=(4, 1, 1),
        output_shapes=[(10,)],
        output_dtypes=[mx.float32],
        template=[("T", mx.float32)],
    )
    return kernel(**{**call, **overrides})[0]


def test_double_runs_a_partial_last_threadgroup():
    assert np.array_equal(np.array(_run_copy(_copy_kernel())), np.arange(10) * 2.0)


@pytest.mark.parametrize(
    "overrides,error",
    [
        (dict(grid=(0, 1, 1)), "grid"),
        (dict(threadgroup=(0, 1, 1)), "threadgroup"),
        (dict(threadgroup=(64, 32, 1)), "more than 1024"),
        (dict(template=[("T", 2.0)]), "int, a bool or a Dtype"),
        (dict(inputs=[mx.arange(10, dtype=mx.float32)]), "Expected `inputs`"),
        (
            dict(inputs=[mx.arange(10, dtype=mx.float32), mx.array(10, dtype=mx.uint32)]),
            "Unable to build",
        ),  # a 0-d input is a reference: n[0] does not compile
    ],
)
def test_double_refuses_what_metal_refuses(overrides, error):
    with pytest.raises((ValueError, TypeError, RuntimeError), match=error):
        _run_copy(_copy_kernel(), **overrides)


def test_each_kernel_compiles_once(doubled, weight):
    _, w = weight
    ops_metal.dequantize(w, mx.float16)
    before = metal_double.compile_count
    ops_metal.dequantize(w, mx.float16)
    assert metal_double.compile_count == before


@pytest.mark.parametrize(
    "overrides,error",
    [
        (dict(output_names=[]), "at least one output"),
        (dict(compile_options=[("math_mode", "safe")]), "to be a dict"),
        (dict(compile_options={"fast_math": True}), "Unknown compile option"),
        (dict(compile_options={"math_mode": "quick"}), "'safe', 'relaxed', or 'fast'"),
    ],
)
def test_double_refuses_a_kernel_mlx_refuses(overrides, error):
    with pytest.raises(ValueError, match=error):
        _copy_kernel(**overrides)


@pytest.mark.parametrize(
    "kernel_overrides,call_overrides,error",
    [
        ({}, dict(output_shapes=[(10,), (10,)]), "output_shapes"),
        ({}, dict(output_dtypes=[mx.float32, mx.float32]), "output_dtypes"),
        ({}, dict(template=[("T", 2**31)]), "does not fit an int"),
        ({}, dict(template=[("T", "float")]), "int, a bool or a Dtype"),
        ({}, dict(grid=(10, 1)), "grid"),
        ({}, dict(threadgroup=(4.0, 1, 1)), "threadgroup"),
        ({}, dict(init_value="zero"), "init_value"),
        ({}, dict(output_dtypes=[mx.complex64]), "no mlx.core.complex64"),
        (dict(input_names=["device", "n"]), {}, "not a valid parameter name"),
        (dict(input_names=["in-put", "n"]), {}, "not a valid parameter name"),
        (dict(output_names=["n"]), {}, "named twice"),
    ],
)
def test_double_refuses_a_call_mlx_refuses(kernel_overrides, call_overrides, error):
    with pytest.raises((ValueError, TypeError, RuntimeError), match=error):
        _run_copy(_copy_kernel(**kernel_overrides), **call_overrides)


def test_double_clamps_the_threadgroup_to_the_grid():
    """MLX dispatches min(threadgroup, grid) per dimension: a kernel sees the clamped size."""
    source = "out[thread_position_in_grid.x] = threads_per_threadgroup.x;"
    kernel = metal_double.metal_kernel(
        name="tg_size", input_names=["inp"], output_names=["out"], source=source
    )
    got = kernel(
        inputs=[mx.zeros((1,))],
        grid=(3, 1, 1),
        threadgroup=(256, 1, 1),
        output_shapes=[(3,)],
        output_dtypes=[mx.uint32],
    )[0]
    assert np.array(got).tolist() == [3, 3, 3]


def test_double_fills_outputs_with_init_value():
    """Elements no thread writes keep init_value (MLX fills the outputs with it first)."""
    got = _run_copy(_copy_kernel(), grid=(4, 1, 1), init_value=-1.5)
    assert np.array(got).tolist() == [0.0, 2.0, 4.0, 6.0] + [-1.5] * 6


@pytest.mark.parametrize("blocksize", [32, 256])
@pytest.mark.parametrize("double_quant", [True, False])
def test_every_op_other_blocksizes_and_layouts(doubled, blocksize, double_quant):
    """Each public op of ops_metal with another blocksize, with and without double quant, a 3-D
    batch, and an absmax passed in: dequantize bit-exact, matmuls within the dtype tolerance."""
    rng = np.random.default_rng(blocksize)
    t = nf4core.quantize(
        rng.standard_normal((19, 70)).astype(np.float32), blocksize, double_quant=double_quant
    )
    w = NF4Weight.from_nf4(t)
    absmax = ops_metal.reconstruct_absmax(w)
    assert np.array_equal(np.array(absmax).view(np.uint32), t.block_absmax().view(np.uint32))
    for dtype in DTYPES:
        got = ops_metal.dequantize(w, dtype, absmax=absmax)
        assert np.array_equal(_bits(got), _bits(ops_reference.dequantize(w, dtype)))
        x = mx.array(rng.standard_normal((2, 3, 70)).astype(np.float32)).astype(dtype)
        g = mx.array(rng.standard_normal((2, 5, 19)).astype(np.float32)).astype(dtype)
        _close(ops_metal.linear(x, w, absmax), ops_reference.linear(x, w), dtype)
        _close(
            ops_metal.linear_grad_input(g, w, absmax), ops_reference.linear_grad_input(g, w), dtype
        )
    assert _calls(doubled)


@pytest.mark.parametrize(
    "overrides,error",
    [
        (dict(ensure_row_contiguous=False), "ensure_row_contiguous=False"),
        (dict(atomic_outputs=True), "atomic outputs"),
        (dict(source="out[0] = threadgroups_per_grid.x;"), "threadgroups_per_grid"),
        (dict(source="out[0] = thread_index_in_simdgroup;"), "simdgroup"),
    ],
)
def test_double_refuses_by_name_what_it_cannot_emulate(overrides, error):
    """MLX accepts these; the double cannot run them faithfully, so it says so."""
    with pytest.raises(NotImplementedError, match=error):
        _copy_kernel(**overrides)
