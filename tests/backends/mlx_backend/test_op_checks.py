"""Every NF4 op refuses bad input at the dispatch boundary on both paths (the reference, and Metal
through the Metal double on Linux), with one ValueError naming the op and the shapes."""

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

import nf4core  # noqa: E402
from backends.mlx_backend import dispatch, ops_metal  # noqa: E402
from backends.mlx_backend.nf4_weight import NF4Weight  # noqa: E402

from . import metal_double  # noqa: E402
from .shim_driver import have_compiler  # noqa: E402

METAL = pytest.param(
    "metal", marks=pytest.mark.skipif(not have_compiler(), reason="needs g++ for the Metal double")
)


@pytest.fixture(params=["reference", METAL])
def path(request, monkeypatch):
    """Ops dispatched to `path`; the Metal path runs the kernels through the double."""
    if request.param == "metal":
        ops_metal._kernel.cache_clear()
        monkeypatch.setattr(mx.fast, "metal_kernel", metal_double.metal_kernel)
        monkeypatch.setattr(dispatch, "metal_usable", lambda: True)
    with dispatch.force_path(request.param):
        yield request.param
    ops_metal._kernel.cache_clear()


@pytest.fixture(scope="module")
def weight() -> NF4Weight:
    w = np.random.default_rng(0).standard_normal((37, 100)).astype(np.float32)
    return NF4Weight.from_nf4(nf4core.quantize(w, blocksize=64, double_quant=True))


def _corrupt(w: NF4Weight, **fields) -> NF4Weight:
    """A weight whose fields were changed after its own checks ran."""
    bad = NF4Weight(**{f: getattr(w, f) for f in w.__dataclass_fields__})
    for name, value in fields.items():
        object.__setattr__(bad, name, value)
    return bad


@pytest.mark.parametrize("rows", [3, 40])  # GEMV and the fused / dequantize strategies
def test_input_width_must_match_the_weight(weight, path, rows):
    x = mx.zeros((rows, 64))
    with pytest.raises(ValueError) as info:
        dispatch.linear(x, weight)
    assert str(info.value) == (
        f"nf4 linear: input ({rows}, 64) does not fit weight (37, 100) (its last dim must be 100)"
    )
    with pytest.raises(ValueError, match=r"nf4 linear_grad_input: input \(2, 100\) does not fit"):
        dispatch.linear_grad_input(mx.zeros((2, 100)), weight)


def test_valid_calls_still_run(weight, path):
    y = dispatch.linear(mx.ones((3, 100)), weight)
    g = dispatch.linear_grad_input(mx.ones((2, 37)), weight)
    mx.eval(y, g)
    assert y.shape == (3, 37) and g.shape == (2, 100)


def test_packed_codes_must_be_uint8(weight, path):
    bad = _corrupt(weight, packed=weight.packed.astype(mx.uint32))
    for call in (
        lambda: dispatch.linear(mx.ones((3, 100)), bad),
        lambda: dispatch.dequantize(bad),
        lambda: dispatch.reconstruct_absmax(bad),
    ):
        with pytest.raises(ValueError, match="packed codes must be 1-D uint8, got uint32"):
            call()


def test_code_table_scales_and_dtypes(weight, path):
    x = mx.ones((3, 100))
    with pytest.raises(ValueError, match="code table must be 16 float32"):
        dispatch.linear(x, _corrupt(weight, quant_map=weight.quant_map.astype(mx.float16)))
    with pytest.raises(ValueError, match="block scales must be uint8"):
        dispatch.linear(x, _corrupt(weight, dq_codes=weight.dq_codes.astype(mx.int32)))
    with pytest.raises(ValueError, match="input must be float32.*got int32"):
        dispatch.linear(mx.ones((3, 100), dtype=mx.int32), weight)
    with pytest.raises(ValueError, match="nf4 dequantize: the result dtype"):
        dispatch.dequantize(weight, mx.int32)
