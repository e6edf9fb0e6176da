"""The torch reference ops are bit-exact with nf4core for every blocksize, with and without double
quant, on odd shapes."""

import numpy as np
import pytest
import torch

import nf4core
from backends.torch_backend import ops, ops_reference
from backends.torch_backend.dispatch import force_path
from backends.torch_backend.nf4_weight import NF4Weight
from tests.backends.torch_backend.conftest import BLOCKSIZES, bits, quantized


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("double_quant", [True, False])
def test_dequantize_bit_exact(rng, blocksize, double_quant):
    for shape in [(1,), (7, 13), (67, 129)]:  # odd counts: a padded nibble and a partial block
        _, t = quantized(rng, shape, blocksize, double_quant, scale=3.0)
        w = NF4Weight.from_nf4(t)
        assert np.array_equal(bits(ops_reference.block_absmax(w)), bits(t.block_absmax()))
        got = ops_reference.dequantize(w)
        assert got.shape == torch.Size(shape)
        assert np.array_equal(bits(got), bits(nf4core.dequantize(t)))


def test_double_quant_spans_several_nested_blocks(rng):
    _, t = quantized(rng, (3, 300 * 32 + 5), 32, True)  # > 256 absmax values: several nested scales
    assert t.double_quant.scales.size > 2
    w = NF4Weight.from_nf4(t)
    assert np.array_equal(bits(ops_reference.dequantize(w)), bits(nf4core.dequantize(t)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dequantize_casts_once_from_float32(rng, dtype):
    _, t = quantized(rng, (9, 70), 64, True)
    got = ops_reference.dequantize(NF4Weight.from_nf4(t), dtype)
    expected = torch.from_numpy(nf4core.dequantize(t)).to(dtype)
    assert got.dtype == dtype and torch.equal(got, expected)


def test_all_zero_and_extreme_blocks(rng):
    w = np.zeros((3, 64), dtype=np.float32)
    w[1] = rng.standard_normal(64) * 1e30
    w[2, 5] = -1e-30
    for dq in (True, False):
        t = nf4core.quantize(w, 64, dq)
        assert np.array_equal(
            bits(ops_reference.dequantize(NF4Weight.from_nf4(t))), bits(nf4core.dequantize(t))
        )


def test_reference_linear_matches_dense(rng):
    _, t = quantized(rng, (11, 40))
    w = NF4Weight.from_nf4(t)
    dense = torch.from_numpy(nf4core.dequantize(t))
    x = torch.randn(2, 3, 40)
    with force_path("reference"):
        assert torch.allclose(ops.linear(x, w), x @ dense.T, atol=1e-6)
        g = torch.randn(2, 3, 11)
        assert torch.allclose(ops.linear_grad_input(g, w), g @ dense, atol=1e-6)


def test_cpu_tensors_take_the_reference_path_by_default(monkeypatch):
    from backends.torch_backend import dispatch

    monkeypatch.delenv("NF4_KERNELS", raising=False)
    monkeypatch.delenv("NF4_QLORA_KERNELS", raising=False)
    assert not dispatch.use_triton(torch.zeros(1))
    with force_path("reference"):
        assert not dispatch.use_triton(torch.zeros(1))
    monkeypatch.setenv("NF4_KERNELS", "bogus")
    with pytest.raises(ValueError, match="NF4_KERNELS"):
        dispatch.use_triton(torch.zeros(1))
    monkeypatch.delenv("NF4_KERNELS")
    monkeypatch.setenv("NF4_QLORA_KERNELS", "bogus")  # the deprecated name still counts
    with pytest.raises(ValueError, match="NF4_QLORA_KERNELS"):
        dispatch.use_triton(torch.zeros(1))
