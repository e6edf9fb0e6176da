"""The Triton kernels of cuda/ run on CPU tensors under TRITON_INTERPRET=1 (set by this folder's
conftest before triton is imported): dequantize bit-exact with nf4core, fused matmuls within the dtype's
tolerance of dequantize-then-matmul in float32. Shapes are tiny: the interpreter is slow."""

import os

import numpy as np
import pytest
import torch

import nf4core
from backends.engine import LoRASettings
from backends.torch_backend import ops, ops_triton
from backends.torch_backend.dispatch import force_path
from backends.torch_backend.lora import LoRALinear
from backends.torch_backend.nf4_linear import NF4Linear
from backends.torch_backend.nf4_weight import NF4Weight
from tests.backends.torch_backend.conftest import (
    BLOCKSIZES,
    TRITON_INTERPRETER_READY,
    bits,
    quantized,
)

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(
    not TRITON_INTERPRETER_READY or os.environ.get("TRITON_INTERPRET") != "1",
    reason="kernels on CPU tensors need TRITON_INTERPRET=1 set before triton is imported",
)

# dtype -> (rtol, atol relative to the largest |output|) for the fused matmuls vs float32
TOLERANCE = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("double_quant", [True, False])
def test_dequantize_kernel_bit_exact(rng, blocksize, double_quant):
    for shape in [(1,), (3, 37), (2, 2101)]:  # odd counts, partial blocks, a row across blocks
        _, t = quantized(rng, shape, blocksize, double_quant, scale=2.0)
        w = NF4Weight.from_nf4(t)
        assert np.array_equal(bits(ops_triton.block_absmax(w)), bits(t.block_absmax()))
        assert np.array_equal(bits(ops_triton.dequantize(w)), bits(nf4core.dequantize(t)))


def test_absmax_kernel_across_nested_blocks(rng):
    _, t = quantized(rng, (700 * 32 + 3,), 32, True, scale=5.0)
    assert t.double_quant.scales.size == 3
    w = NF4Weight.from_nf4(t)
    assert np.array_equal(bits(ops_triton.block_absmax(w)), bits(t.block_absmax()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dequantize_kernel_rounds_like_torch(rng, dtype):
    _, t = quantized(rng, (5, 99), 64, True, scale=3.0)
    got = ops_triton.dequantize(NF4Weight.from_nf4(t), dtype)
    assert torch.equal(got, torch.from_numpy(nf4core.dequantize(t)).to(dtype))


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    rtol, atol = TOLERANCE[dtype]
    scale = want.abs().max().item()
    err = (got.float() - want).abs().max().item()
    assert got.dtype == dtype and got.shape == want.shape
    assert torch.allclose(got.float(), want, rtol=rtol, atol=atol * scale), (err, scale)


@pytest.fixture(scope="module")
def weight():
    rng = np.random.default_rng(7)
    _, t = quantized(rng, (37, 100), 64, True)  # N = 37, K = 100: neither a multiple of a tile
    return t, NF4Weight.from_nf4(t)


@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("m", [1, 3, 33])
def test_fused_forward_and_input_grad(weight, dtype, m):
    t, w = weight
    dense = torch.from_numpy(nf4core.dequantize(t))  # (N, K) float32
    x = torch.randn(m, 100).to(dtype)
    g = torch.randn(m, 37).to(dtype)
    w_c = dense.to(dtype).float()  # the kernel rounds W to the compute dtype, as the reference does
    _close(ops_triton._matmul(x, w, transposed=True), x.float() @ w_c.T, dtype)
    _close(ops_triton.linear_grad_input(g, w), g.float() @ w_c, dtype)
    if m <= ops_triton.GEMV_MAX_ROWS:
        _close(ops_triton.gemv(x, w), x.float() @ w_c.T, dtype)
    _close(ops_triton.linear(x.view(m, 1, 100), w).view(m, 37), x.float() @ w_c.T, dtype)


def test_strided_input(weight):
    t, w = weight
    x = torch.randn(100, 33).t()  # (33, 100), column-major
    dense = torch.from_numpy(nf4core.dequantize(t))
    _close(ops_triton.linear(x, w), x @ dense.T, torch.float32)


def test_nf4_linear_uses_the_kernels_when_forced(weight, monkeypatch):
    t, _ = weight
    calls = []
    for name in ("linear", "linear_grad_input"):
        fn = getattr(ops_triton, name)
        monkeypatch.setattr(
            ops_triton, name, lambda *a, _fn=fn, _n=name: calls.append(_n) or _fn(*a)
        )
    lora = LoRALinear.from_base(NF4Linear.from_nf4(t), "m", LoRASettings(r=2))
    x = torch.randn(9, 100, requires_grad=True)
    with force_path("triton"):
        y = lora(x)
        y.square().sum().backward()
    assert calls == ["linear", "linear_grad_input"]
    grads = (x.grad.clone(), lora.lora_A.weight.grad.clone())
    x.grad, lora.lora_A.weight.grad = None, None
    with force_path("reference"):
        y_ref = lora(x)
        y_ref.square().sum().backward()
    assert torch.allclose(y, y_ref, atol=1e-4)
    assert torch.allclose(grads[0], x.grad, atol=1e-3) and torch.allclose(
        grads[1], lora.lora_A.weight.grad, rtol=1e-4, atol=1e-3
    )
    with force_path("triton"):
        assert torch.equal(
            ops.dequantize(NF4Weight.from_nf4(t)), torch.from_numpy(nf4core.dequantize(t))
        )


def test_empty_batch(weight):
    _, w = weight
    assert ops_triton.linear(torch.randn(0, 100), w).shape == (0, 37)
    assert ops_triton.linear_grad_input(torch.randn(2, 0, 37), w).shape == (2, 0, 100)
