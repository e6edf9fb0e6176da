"""On an NVIDIA GPU: the compiled kernels (not the interpreter) against nf4core and the reference."""

import numpy as np
import pytest
import torch

import nf4core
from backends.torch_backend import ops_reference
from backends.torch_backend.nf4_linear import NF4Linear
from backends.torch_backend.nf4_weight import NF4Weight
from tests.backends.torch_backend.conftest import BLOCKSIZES, bits, quantized

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("double_quant", [True, False])
def test_compiled_dequant_bit_exact(rng, blocksize, double_quant):
    pytest.importorskip("triton")
    from backends.torch_backend import ops_triton

    for shape in [(1,), (3, 37), (257, 4099)]:
        _, t = quantized(rng, shape, blocksize, double_quant, scale=3.0)
        w = NF4Weight.from_nf4(t, "cuda")
        assert np.array_equal(bits(ops_triton.block_absmax(w)), bits(t.block_absmax()))
        assert np.array_equal(bits(ops_triton.dequantize(w)), bits(nf4core.dequantize(t)))
        assert np.array_equal(bits(ops_reference.dequantize(w)), bits(nf4core.dequantize(t)))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_nf4_linear_on_cuda(rng, dtype, tol):
    _, t = quantized(rng, (300, 515))
    layer = NF4Linear.from_nf4(t).to("cuda")
    dense = torch.from_numpy(nf4core.dequantize(t)).cuda().to(dtype).float()
    for m in (1, 3, 33):
        x = torch.randn(m, 515, device="cuda", dtype=dtype, requires_grad=True)
        y = layer(x)
        y.float().sum().backward()
        want = x.detach().float() @ dense.T
        assert (y.float() - want).abs().max() <= tol * want.abs().max()
        grad_want = torch.ones(m, 300, device="cuda") @ dense
        assert (x.grad.float() - grad_want).abs().max() <= tol * grad_want.abs().max()
