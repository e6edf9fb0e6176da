"""MLX's DoRA layer against the torch one (itself checked against peft) on the same NF4 weights:
initial magnitude, output and gradients, with and without a bias; the norm is held constant."""

from __future__ import annotations

import numpy as np
import pytest

import nf4core

mx = pytest.importorskip("mlx.core")
torch = pytest.importorskip("torch")
from mlx.utils import tree_flatten

from backends.engine import LoRASettings
from backends.mlx_backend.lora import LoRALinear as MLXLoRA
from backends.mlx_backend.nf4_linear import NF4Linear as MLXNF4
from backends.torch_backend.lora import LoRALinear as TorchLoRA
from backends.torch_backend.nf4_linear import NF4Linear as TorchNF4


@pytest.mark.parametrize("bias", [False, True])
def test_mlx_dora_matches_torch_output_and_gradients(bias):
    rng = np.random.default_rng(4)
    t = nf4core.quantize(rng.standard_normal((24, 40)).astype(np.float32), 64, True)
    b = rng.standard_normal(24).astype(np.float32) if bias else None
    settings = LoRASettings(r=4, alpha=8.0, targets=("proj",), use_dora=True)
    ours_t = TorchLoRA.from_base(TorchNF4.from_nf4(t, b), "proj", settings)
    ours_m = MLXLoRA.from_base(MLXNF4.from_nf4(t, b), "proj", settings)
    np.testing.assert_allclose(
        np.array(ours_m.lora_magnitude_vector),
        ours_t.lora_magnitude_vector.detach().numpy(),
        rtol=1e-6,
    )
    lora_b = rng.standard_normal((24, 4)).astype(np.float32) * 0.3
    magnitude = ours_t.lora_magnitude_vector.detach().numpy() * rng.uniform(0.5, 1.5, 24)
    magnitude = magnitude.astype(np.float32)
    with torch.no_grad():
        ours_t.lora_B.weight.copy_(torch.from_numpy(lora_b))
        ours_t.lora_magnitude_vector.copy_(torch.from_numpy(magnitude))
    ours_m.lora_B, ours_m.lora_magnitude_vector = mx.array(lora_b), mx.array(magnitude)
    x = rng.standard_normal((2, 3, 40)).astype(np.float32)

    want = ours_t(torch.from_numpy(x))
    want.square().sum().backward()

    def loss(params):
        ours_m.update(params)
        return mx.sum(mx.square(ours_m(mx.array(x))))

    got = ours_m(mx.array(x))
    np.testing.assert_allclose(np.array(got), want.detach().numpy(), atol=1e-5, rtol=1e-5)
    grads = dict(tree_flatten(mx.grad(loss)(ours_m.trainable_parameters())))
    assert sorted(grads) == ["lora_A", "lora_B", "lora_magnitude_vector"]
    for name, value in grads.items():
        ref = getattr(ours_t, name)
        ref = ref.weight if name != "lora_magnitude_vector" else ref
        np.testing.assert_allclose(np.array(value), ref.grad.numpy(), atol=1e-4, rtol=1e-4)


def test_mlx_dora_with_dropout_rescales_the_dropped_input_as_peft_does():
    """With dropout active, peft (and torch_backend, checked against it) computes
    W x + b + (m/n - 1) W x' + m/n s B A x' with x' the dropped input and n = ||W + s B A||_row."""
    rng = np.random.default_rng(5)
    t = nf4core.quantize(rng.standard_normal((16, 32)).astype(np.float32), 64, True)
    b = rng.standard_normal(16).astype(np.float32)
    settings = LoRASettings(r=2, alpha=4.0, dropout=0.5, targets=("proj",), use_dora=True)
    layer = MLXLoRA.from_base(MLXNF4.from_nf4(t, b), "proj", settings)
    layer.lora_B = mx.array(rng.standard_normal((16, 2)).astype(np.float32))
    layer.train()
    x = rng.standard_normal((3, 32)).astype(np.float32)
    key = mx.random.key(9)
    layer.set_dropout_key(key)
    got = np.array(layer(mx.array(x)))
    keep = np.array(mx.random.bernoulli(0.5, x.shape, key=key)).astype(np.float32)
    dropped = x * keep * 2.0
    w = nf4core.dequantize(t).astype(np.float64)
    a, lb = np.array(layer.lora_A, np.float64), np.array(layer.lora_B, np.float64)
    rescale = np.array(layer.lora_magnitude_vector) / np.linalg.norm(w + 2.0 * lb @ a, axis=1)
    want = x @ w.T + b + (rescale - 1) * (dropped @ w.T) + rescale * 2.0 * (dropped @ a.T @ lb.T)
    assert not np.allclose(keep, 1.0)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
