"""Auto mode trusts a Metal kernel only after its self-check: a broken kernel (wrong values, or a
body that fails to build) costs one warning and runs the reference; correct kernels pass silently,
once per op and dtype; a forced path runs as forced, unchecked. On Linux the kernels run through
the Metal double (metal_double.py), with auto mode told a Metal device is the default."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

import nf4core  # noqa: E402
from backends import kernel_self_check  # noqa: E402
from backends.mlx_backend import dispatch, ops_metal, ops_reference  # noqa: E402
from backends.mlx_backend.nf4_weight import NF4Weight  # noqa: E402

from . import metal_double  # noqa: E402
from .shim_driver import have_compiler  # noqa: E402

pytestmark = pytest.mark.skipif(not have_compiler(), reason="needs g++ for the Metal double")
DTYPES = (mx.float32, mx.float16, mx.bfloat16)


@pytest.fixture
def auto_takes_metal(monkeypatch):
    """mx.fast.metal_kernel is the double, auto mode sees a Metal device, no verdict is cached.
    Yields the kernels made (each records its launches)."""
    made = []

    def make(**kwargs):
        made.append(metal_double.metal_kernel(**kwargs))
        return made[-1]

    for name in ("NF4_KERNELS", "NF4_MLX_KERNELS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(dispatch, "metal_usable", lambda: True)
    monkeypatch.setattr(mx.fast, "metal_kernel", make)
    ops_metal._kernel.cache_clear()
    kernel_self_check.reset()
    yield made
    kernel_self_check.reset()
    ops_metal._kernel.cache_clear()


@pytest.fixture(scope="module")
def weight():
    w = np.random.default_rng(4).standard_normal((13, 70)).astype(np.float32)
    return NF4Weight.from_nf4(nf4core.quantize(w, blocksize=64, double_quant=True))


def _launches(made) -> int:
    return sum(len(kernel.calls) for kernel in made)


def _runtime_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, RuntimeWarning)]


def _bits(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32)).view(np.uint32)


def _replace_in_source(monkeypatch, kernel: str, old: str, new: str) -> None:
    original = ops_metal.load_source
    body = original(kernel)
    assert old in body
    changed = body.replace(old, new)
    monkeypatch.setattr(
        ops_metal, "load_source", lambda name: changed if name == kernel else original(name)
    )


def test_correct_kernels_pass_silently_once_per_op_and_dtype(auto_takes_metal, weight):
    rng = np.random.default_rng(0)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for dtype in DTYPES:
            x = mx.array(rng.standard_normal((2, 70)).astype(np.float32)).astype(dtype)
            g = mx.array(rng.standard_normal((2, 13)).astype(np.float32)).astype(dtype)
            for _ in range(2):
                got = dispatch.dequantize(weight, dtype)
                assert np.array_equal(_bits(got), _bits(ops_reference.dequantize(weight, dtype)))
                dispatch.linear(x, weight)
                dispatch.linear_grad_input(g, weight)
    assert _runtime_warnings(record) == []
    assert sorted(kernel_self_check._verdicts.values()) == [True] * 9  # 3 ops x 3 dtypes
    before = _launches(auto_takes_metal)
    dispatch.linear(x, weight)  # checked already: no self-check, the kernels run
    assert _launches(auto_takes_metal) == before + 3  # absmax scale and offset, then the GEMV


def test_a_wrong_dequantize_kernel_warns_once_and_the_reference_runs(
    auto_takes_metal, weight, monkeypatch
):
    """Nibbles read in the wrong order: dequantize and the matmul route through dequantize both
    fail their checks; each warns once, and every result is the reference's."""
    _replace_in_source(monkeypatch, "nf4_dequant", "bits >> 4", "bits & 15 ")
    x = mx.array(np.random.default_rng(1).standard_normal((2, 70)).astype(np.float32))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(2):
            got = dispatch.dequantize(weight)
            y = dispatch.linear(x, weight)
    messages = _runtime_warnings(record)
    assert len(messages) == 2
    assert messages[0].startswith(
        "metal dequantize kernel (float32) disagrees with the reference on a self-check (max |diff|"
    )
    assert messages[0].endswith("; using the reference path")
    assert messages[1].startswith("metal linear kernel (float32) disagrees")
    assert np.array_equal(_bits(got), _bits(ops_reference.dequantize(weight)))
    assert np.array_equal(np.array(y), np.array(ops_reference.linear(x, weight)))


def test_a_kernel_that_fails_to_build_warns_once_and_the_reference_runs(
    auto_takes_metal, weight, monkeypatch
):
    """The GEMV body does not compile: linear falls back; linear_grad_input (other kernels) stays Metal."""
    _replace_in_source(monkeypatch, "nf4_gemv", "thread_position_in_grid", "thread_position_in_grd")
    rng = np.random.default_rng(2)
    x = mx.array(rng.standard_normal((2, 70)).astype(np.float32)).astype(mx.float16)
    g = mx.array(rng.standard_normal((2, 13)).astype(np.float32)).astype(mx.float16)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        y = dispatch.linear(x, weight)
        dispatch.linear(x, weight)
        dispatch.linear_grad_input(g, weight)
    (message,) = _runtime_warnings(record)
    assert message.startswith(
        "metal linear kernel (float16) failed on a self-check "
        "(RuntimeError: [metal_kernel] Unable to build metal library from source:"
    )
    assert np.array_equal(np.array(y), np.array(ops_reference.linear(x, weight)))
    assert kernel_self_check._verdicts == {
        ("metal", "linear", "float16", str(mx.default_device())): False,
        ("metal", "linear_grad_input", "float16", str(mx.default_device())): True,
    }


def test_a_raising_op_warns_once_and_the_reference_runs(auto_takes_metal, weight, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("[metal_kernel] threadgroup (2048, 1, 1) has more than 1024 threads")

    monkeypatch.setattr(ops_metal, "linear_grad_input", broken)
    g = mx.array(np.random.default_rng(3).standard_normal((4, 13)).astype(np.float32))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        dx = dispatch.linear_grad_input(g, weight)
    assert _runtime_warnings(record) == [
        "metal linear_grad_input kernel (float32) failed on a self-check (ValueError: [metal_kernel] "
        "threadgroup (2048, 1, 1) has more than 1024 threads); using the reference path"
    ]
    assert np.array_equal(np.array(dx), np.array(ops_reference.linear_grad_input(g, weight)))


@pytest.mark.parametrize("how", ["force_path", "environment"])
def test_a_forced_metal_path_runs_as_forced_without_a_self_check(
    auto_takes_metal, weight, monkeypatch, how
):
    _replace_in_source(monkeypatch, "nf4_dequant", "bits >> 4", "bits & 15 ")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        if how == "force_path":
            with dispatch.force_path("metal"):
                got = dispatch.dequantize(weight)
        else:
            monkeypatch.setenv("NF4_KERNELS", "metal")
            got = dispatch.dequantize(weight)
    assert _runtime_warnings(record) == []
    assert not np.array_equal(_bits(got), _bits(ops_reference.dequantize(weight)))  # it ran
    assert kernel_self_check._verdicts == {}


def test_the_reference_path_never_self_checks(auto_takes_metal, weight):
    with dispatch.force_path("reference"):
        dispatch.dequantize(weight)
        dispatch.linear(mx.zeros((2, 70)), weight)
    assert _launches(auto_takes_metal) == 0 and kernel_self_check._verdicts == {}
