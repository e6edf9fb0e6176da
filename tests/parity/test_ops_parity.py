"""The same NF4 weight on both backends and in nf4core: dequantize bit for bit, and NF4Linear + LoRA
forward and gradients within float32 tolerance."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
mx = pytest.importorskip("mlx.core")

import nf4core  # noqa: E402
from backends.mlx_backend import ops_reference as mlx_ops  # noqa: E402
from backends.mlx_backend.lora import LoRALinear as MLXLoRALinear  # noqa: E402
from backends.mlx_backend.nf4_linear import NF4Linear as MLXNF4Linear  # noqa: E402
from backends.mlx_backend.nf4_weight import NF4Weight as MLXNF4Weight  # noqa: E402
from backends.torch_backend import ops as torch_ops  # noqa: E402
from backends.torch_backend.dispatch import force_path  # noqa: E402
from backends.torch_backend.lora import LoRALinear  # noqa: E402
from backends.torch_backend.nf4_linear import NF4Linear  # noqa: E402
from backends.torch_backend.nf4_weight import NF4Weight  # noqa: E402


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 512, 1024, 2048, 4096])
def test_dequantize_is_bit_exact_across_backends(blocksize, double_quant):
    w = np.random.default_rng(blocksize).standard_normal((33, 257)).astype(np.float32)
    t = nf4core.quantize(w, blocksize, double_quant)
    spec = nf4core.dequantize(t).view(np.uint32)
    for path in ("auto", "reference"):  # CPU tensors: nf4core's decoder, then the torch twin
        with force_path(path):
            got = torch_ops.dequantize(NF4Weight.from_nf4(t)).numpy().view(np.uint32)
        assert np.array_equal(got, spec), path
    assert np.array_equal(
        np.array(mlx_ops.dequantize(MLXNF4Weight.from_nf4(t))).view(np.uint32), spec
    )


def test_nf4_linear_with_lora_forward_and_gradients_agree():
    rng = np.random.default_rng(0)
    t = nf4core.quantize(rng.standard_normal((48, 100)).astype(np.float32), 64)  # (out, in)
    a = rng.standard_normal((4, 100)).astype(np.float32) * 0.1
    b = rng.standard_normal((48, 4)).astype(np.float32) * 0.1  # non-zero, so A gets a gradient
    x = rng.standard_normal((3, 5, 100)).astype(np.float32)
    g = rng.standard_normal((3, 5, 48)).astype(np.float32)  # upstream gradient

    layer = LoRALinear(NF4Linear.from_nf4(t), torch.from_numpy(a), torch.from_numpy(b), scale=2.0)
    xt = torch.from_numpy(x).requires_grad_(True)
    yt = layer(xt)
    (yt * torch.from_numpy(g)).sum().backward()
    torch_out = [
        yt.detach().numpy(),
        xt.grad.numpy(),
        layer.lora_A.weight.grad.numpy(),
        layer.lora_B.weight.grad.numpy(),
    ]

    mlx_layer = MLXLoRALinear(MLXNF4Linear.from_nf4(t), mx.array(a), mx.array(b), scale=2.0)

    def loss(xm, am, bm):
        mlx_layer.lora_A, mlx_layer.lora_B = am, bm
        return (mlx_layer(xm) * mx.array(g)).sum()

    grads = mx.grad(loss, argnums=(0, 1, 2))(mx.array(x), mx.array(a), mx.array(b))
    mlx_layer.lora_A, mlx_layer.lora_B = mx.array(a), mx.array(b)
    mlx_out = [np.array(mlx_layer(mx.array(x)))] + [np.array(v) for v in grads]
    for name, ours, theirs in zip(("y", "dx", "dA", "dB"), torch_out, mlx_out):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-4, err_msg=name)
