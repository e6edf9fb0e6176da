"""NF4Weight round trip and the plain-mlx reference dequantize, bit-exact with nf4core."""

from __future__ import annotations

import numpy as np
import pytest

import nf4core
from nf4core.blockwise import ALLOWED_BLOCKSIZES

mx = pytest.importorskip("mlx.core")
from backends.mlx_backend import ops_reference
from backends.mlx_backend.nf4_weight import NF4Weight

SHAPES = [(37, 129), (5,), (3, 1, 4099)]  # odd element counts, partial last blocks


def _bits(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    return a.view(np.uint16 if a.dtype.itemsize == 2 else np.uint32)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("blocksize", ALLOWED_BLOCKSIZES)
def test_reference_dequantize_bit_exact(blocksize, double_quant):
    rng = np.random.default_rng(blocksize)
    for shape in SHAPES:
        w = (rng.standard_normal(shape) * 2.5).astype(np.float32)
        t = nf4core.quantize(w, blocksize=blocksize, double_quant=double_quant)
        weight = NF4Weight.from_nf4(t)
        np.testing.assert_array_equal(
            _bits(np.array(ops_reference.reconstruct_absmax(weight))), _bits(t.block_absmax())
        )
        for name, dtype in (
            ("float32", mx.float32),
            ("float16", mx.float16),
            ("bfloat16", mx.bfloat16),
        ):
            got = ops_reference.dequantize(weight, dtype)
            want = nf4core.dequantize(t, name)
            assert got.shape == want.shape
            got_np = np.array(got.view(mx.uint16 if name != "float32" else mx.uint32))
            np.testing.assert_array_equal(got_np.reshape(-1), _bits(want).reshape(-1))


@pytest.mark.parametrize("double_quant", [False, True])
def test_weight_round_trip_is_bit_identical(double_quant):
    w = np.random.default_rng(1).standard_normal((19, 77)).astype(np.float32)
    t = nf4core.quantize(w, blocksize=128, double_quant=double_quant)
    back = NF4Weight.from_nf4(t).to_nf4()
    np.testing.assert_array_equal(back.packed, t.packed)
    np.testing.assert_array_equal(
        back.block_absmax().view(np.uint32), t.block_absmax().view(np.uint32)
    )
    assert (back.shape, back.dtype, back.blocksize) == (t.shape, t.dtype, t.blocksize)
    if double_quant:
        np.testing.assert_array_equal(back.double_quant.codes, t.double_quant.codes)
        assert back.double_quant.offset == t.double_quant.offset


def test_high_nibble_is_the_first_element():
    t = nf4core.quantize(np.array([1.0, -1.0, 0.5], np.float32), blocksize=64, double_quant=False)
    got = np.array(ops_reference.dequantize(NF4Weight.from_nf4(t)))
    assert got[0] == 1.0 and got[1] == -1.0  # bitsandbytes' order; MLX's LSB-first would swap them


def test_dequantize_bit_exact_inside_mx_compile():
    """Under mx.compile (fused elementwise kernels) the double-quant absmax is still nf4core's."""
    t = nf4core.quantize(
        np.random.default_rng(3).standard_normal((300, 1000)).astype(np.float32),
        blocksize=32,
        double_quant=True,
    )
    weight = NF4Weight.from_nf4(t)
    absmax = mx.compile(lambda: ops_reference.reconstruct_absmax(weight))()
    np.testing.assert_array_equal(_bits(np.array(absmax)), _bits(t.block_absmax()))
    values = mx.compile(lambda: ops_reference.dequantize(weight))()
    np.testing.assert_array_equal(_bits(np.array(values)), _bits(nf4core.dequantize(t)))
