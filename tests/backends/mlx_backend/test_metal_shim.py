"""Every Metal kernel body in metal/, compiled as C++ through the shim and checked against nf4core."""

from __future__ import annotations

import numpy as np
import pytest

import nf4core
from nf4core.blockwise import ALLOWED_BLOCKSIZES

from .shim_driver import ShimKernel, have_compiler

pytestmark = pytest.mark.skipif(not have_compiler(), reason="needs g++ for the Metal shim")


def _weight(shape, blocksize, double_quant, seed=0):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal(shape) * rng.uniform(0.1, 4.0)).astype(np.float32)
    return nf4core.quantize(w, blocksize=blocksize, double_quant=double_quant)


def _weight_inputs(t):
    return {"packed": t.packed, "absmax": t.block_absmax(), "quant_map": t.quant_map}


def test_absmax_reconstruction_bit_exact(tmp_path):
    scale = ShimKernel("nf4_absmax_scale", tmp_path, DQ_BS=256)
    offset = ShimKernel("nf4_absmax_offset", tmp_path)
    t = _weight((300, 131), 64, True)  # 615 blocks: three nested blocks, the last partial
    dq, n = t.double_quant, t.n_blocks
    dims = np.array([n], dtype=np.uint32)
    scaled = scale(
        (n, 1, 1),
        {"dq_codes": dq.codes, "dq_scales": dq.scales, "dq_quant_map": dq.quant_map, "dims": dims},
        {"scaled": n},
    )["scaled"]
    absmax = offset(
        (n, 1, 1),
        {"scaled": scaled, "offset": np.array([dq.offset], np.float32), "dims": dims},
        {"absmax": n},
    )["absmax"]
    np.testing.assert_array_equal(absmax.view(np.uint32), t.block_absmax().view(np.uint32))


@pytest.mark.parametrize("blocksize", ALLOWED_BLOCKSIZES)
def test_dequant_bit_exact(tmp_path, blocksize):
    kernel = ShimKernel("nf4_dequant", tmp_path, BS=blocksize)
    for shape, dq in (((37, 129), False), ((1, 4097), True), ((3,), False)):  # odd: partial blocks
        t = _weight(shape, blocksize, dq)
        grid = ((t.numel + 1) // 2, 1, 1)
        got = kernel(
            grid, {**_weight_inputs(t), "dims": np.array([t.numel], np.uint32)}, {"out": t.numel}
        )["out"]
        want = nf4core.dequantize(t, np.float32).reshape(-1)
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


def _dense(t):
    return nf4core.dequantize(t, np.float32).astype(np.float64)


@pytest.mark.parametrize("blocksize", [32, 64])
def test_fused_matmul_forward(tmp_path, blocksize):
    kernel = ShimKernel("nf4_matmul", tmp_path, BS=blocksize)
    m, n, k = 5, 7, 67  # K odd: every other weight row starts mid-byte
    t = _weight((n, k), blocksize, True, seed=1)
    x = np.random.default_rng(2).standard_normal((m, k)).astype(np.float32)
    dims = np.array([m, n, k], np.uint32)
    y = kernel((n, m, 1), {"x": x, **_weight_inputs(t), "dims": dims}, {"y": m * n})["y"]
    np.testing.assert_allclose(y.reshape(m, n), x @ _dense(t).T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("blocksize", [32, 128])
def test_fused_matmul_input_grad(tmp_path, blocksize):
    kernel = ShimKernel("nf4_matmul_t", tmp_path, BS=blocksize)
    m, n, k = 3, 11, 45
    t = _weight((n, k), blocksize, False, seed=3)
    dy = np.random.default_rng(4).standard_normal((m, n)).astype(np.float32)
    dims = np.array([m, n, k], np.uint32)
    dx = kernel((k, m, 1), {"dy": dy, **_weight_inputs(t), "dims": dims}, {"dx": m * k})["dx"]
    np.testing.assert_allclose(dx.reshape(m, k), dy @ _dense(t), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m,k", [(1, 67), (3, 66), (8, 33)])
def test_gemv_small_batch(tmp_path, m, k):
    kernel = ShimKernel("nf4_gemv", tmp_path, BS=32, ROWS=8)
    n = 9
    t = _weight((n, k), 32, True, seed=5)
    x = np.random.default_rng(6).standard_normal((m, k)).astype(np.float32)
    dims = np.array([m, n, k], np.uint32)
    y = kernel((n, 1, 1), {"x": x, **_weight_inputs(t), "dims": dims}, {"y": m * n})["y"]
    np.testing.assert_allclose(y.reshape(m, n), x @ _dense(t).T, rtol=1e-5, atol=1e-5)


def test_shim_detects_wrong_nibble_order(tmp_path):
    """The comparison can fail: a weight whose nibbles are swapped does not pass for the original."""
    kernel = ShimKernel("nf4_dequant", tmp_path, BS=64)
    t = _weight((10, 64), 64, False)
    swapped = ((t.packed & 15) << 4) | (t.packed >> 4)
    inputs = {
        "packed": swapped.astype(np.uint8),
        "absmax": t.absmax,
        "quant_map": t.quant_map,
        "dims": np.array([t.numel], np.uint32),
    }
    got = kernel(((t.numel + 1) // 2, 1, 1), inputs, {"out": t.numel})["out"]
    assert not np.array_equal(got, nf4core.dequantize(t).reshape(-1))
