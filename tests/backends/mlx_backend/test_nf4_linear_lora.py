"""NF4Linear and LoRALinear: forward and gradients against a dense float32 reference."""

from __future__ import annotations

import numpy as np
import pytest

import nf4core

mx = pytest.importorskip("mlx.core")
nn = pytest.importorskip("mlx.nn")
from mlx.utils import tree_flatten

from backends.engine import LoRASettings
from backends.mlx_backend.lora import LoRALinear
from backends.mlx_backend.nf4_linear import NF4Linear


def _layer(out_f=13, in_f=37, bias=False, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((out_f, in_f)).astype(np.float32)
    b = rng.standard_normal(out_f).astype(np.float32) if bias else None
    t = nf4core.quantize(w, blocksize=32, double_quant=True)
    return NF4Linear.from_nf4(t, b), nf4core.dequantize(t).astype(np.float64), b


@pytest.mark.parametrize("bias", [False, True])
def test_nf4_linear_forward_and_input_grad(bias):
    layer, w, b = _layer(bias=bias)
    x = np.random.default_rng(1).standard_normal((2, 5, 37)).astype(np.float32)
    g = np.random.default_rng(2).standard_normal((2, 5, 13)).astype(np.float32)
    y = layer(mx.array(x))
    want = x @ w.T + (0 if b is None else b)
    np.testing.assert_allclose(np.array(y), want, rtol=1e-5, atol=1e-5)
    # analytic: d/dx sum(g * (x W^T)) = g W
    dx = mx.grad(lambda v: mx.sum(layer(v) * mx.array(g)))(mx.array(x))
    np.testing.assert_allclose(np.array(dx), g @ w, rtol=1e-5, atol=1e-5)
    assert tree_flatten(layer.trainable_parameters()) == []


def test_lora_gradients_match_dense_reference():
    base, w, _ = _layer(bias=True, seed=3)
    lora = LoRALinear.from_base(base, "layer", LoRASettings(r=4, alpha=8.0, seed=7))
    lora.lora_B = mx.array(np.random.default_rng(4).standard_normal((13, 4)).astype(np.float32))
    x = mx.array(np.random.default_rng(5).standard_normal((3, 37)).astype(np.float32))
    g = mx.array(np.random.default_rng(6).standard_normal((3, 13)).astype(np.float32))

    def loss(params, inp):
        lora.update(params)
        return mx.sum(lora(inp) * g)

    params = lora.trainable_parameters()
    assert sorted(k for k, _ in tree_flatten(params)) == ["lora_A", "lora_B"]
    grads, dx = mx.grad(loss, argnums=(0, 1))(params, x)

    # the same function written densely in float32 with mlx's own autodiff
    wd = mx.array(w.astype(np.float32))

    def dense(a, b_, inp):
        return mx.sum((inp @ wd.T + 2.0 * (inp @ a.T) @ b_.T) * g)

    da, db, dx_ref = mx.grad(dense, argnums=(0, 1, 2))(params["lora_A"], params["lora_B"], x)
    for got, want in ((grads["lora_A"], da), (grads["lora_B"], db), (dx, dx_ref)):
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-4, atol=1e-4)


def test_lora_finite_differences():
    base, _, _ = _layer(out_f=5, in_f=9, seed=8)
    lora = LoRALinear.from_base(base, "fd", LoRASettings(r=2, alpha=4.0, seed=1))
    lora.lora_B = mx.array(np.random.default_rng(9).standard_normal((5, 2)).astype(np.float32))
    x = mx.array(np.random.default_rng(10).standard_normal((4, 9)).astype(np.float32))

    def f(a):
        lora.lora_A = a
        return mx.sum(mx.tanh(lora(x)))

    a0 = lora.lora_A
    grad = np.array(mx.grad(f)(a0))
    eps, a_np = 1e-2, np.array(a0)
    for idx in [(0, 0), (1, 4), (0, 8)]:
        plus, minus = a_np.copy(), a_np.copy()
        plus[idx] += eps
        minus[idx] -= eps
        fd = (f(mx.array(plus)).item() - f(mx.array(minus)).item()) / (2 * eps)
        assert abs(fd - grad[idx]) < 2e-3 * max(1.0, abs(fd))


def test_lora_init_matches_nf4core_and_the_forward_formula():
    base, _, _ = _layer(bias=True, seed=11)
    lora = LoRALinear.from_base(base, "m.q_proj", LoRASettings(r=4, alpha=16.0, seed=3))
    a, b0 = nf4core.lora_init("m.q_proj", 37, 13, 4, 3)
    np.testing.assert_array_equal(np.array(lora.lora_A), a)
    np.testing.assert_array_equal(np.array(lora.lora_B), b0)
    assert lora.scale == 4.0  # alpha / r
    lora.lora_B = mx.array(np.random.default_rng(12).standard_normal((13, 4)).astype(np.float32))
    x = mx.array(np.random.default_rng(13).standard_normal((6, 37)).astype(np.float32))
    want = base(x) + 4.0 * (x @ lora.lora_A.T) @ lora.lora_B.T
    np.testing.assert_allclose(np.array(lora(x)), np.array(want), rtol=1e-4, atol=1e-4)


def test_lora_dropout_only_in_training():
    base, _, _ = _layer(seed=14)
    lora = LoRALinear.from_base(base, "d", LoRASettings(r=4, dropout=0.5))
    lora.lora_B = mx.ones((13, 4))
    x = mx.ones((2, 37))
    lora.eval()
    first = np.array(lora(x))
    np.testing.assert_array_equal(first, np.array(lora(x)))
    lora.train()
    assert not np.allclose(np.array(lora(x)), first)


def test_lora_config_validation():
    with pytest.raises(ValueError, match="rank"):
        LoRASettings(r=0)
    with pytest.raises(ValueError, match="dropout"):
        LoRASettings(dropout=1.5)


def test_backward_does_not_keep_dequantized_weights():
    """Peak memory of a forward+backward through 16 NF4 layers stays a few weights' worth;
    keeping each layer's dequantized weight for backward (plain autodiff) needs all 16."""
    from backends.mlx_backend import ops_reference

    n, n_layers = 256, 16
    rng = np.random.default_rng(0)
    layers = [
        NF4Linear.from_dense((rng.standard_normal((n, n)) * 0.04).astype(np.float32))
        for _ in range(n_layers)
    ]
    x = mx.ones((4, n))
    weight_bytes = n * n * 4

    def ours(v):
        for layer in layers:
            v = layer(v)
        return v.sum()

    def plain_autodiff(v):
        for layer in layers:
            v = v @ ops_reference.dequantize(layer.nf4).T
        return v.sum()

    def peak(fn):
        mx.eval(x)
        mx.clear_cache()
        mx.reset_peak_memory()
        start = mx.get_active_memory()
        mx.eval(mx.grad(fn)(x))
        return (mx.get_peak_memory() - start) / weight_bytes

    assert peak(ours) < n_layers / 2
    assert peak(plain_autodiff) > 0.75 * n_layers  # the measurement can tell the difference
