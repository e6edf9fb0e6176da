"""The dequant cache of inference: same results as the per-call path, bounded, never in training.
It serves the calls the CPU GEMV kernel does not take (no compiler, a failed self-check, many rows),
so these tests turn the kernel off; test_cpu_gemv.py covers how the two share decoding."""

import numpy as np
import pytest
import torch

import nf4core
from backends.torch_backend import dequant_cache, dispatch
from backends.torch_backend.dequant_cache import DequantCache, budget_from_env
from backends.torch_backend.generate import SamplingConfig, generate, greedy_steps
from backends.torch_backend.model import CausalLM
from backends.torch_backend.nf4_linear import NF4Linear, cached_weight, nf4_linear
from tests.backends.torch_backend.conftest import bits, quantized
from tests.backends.torch_backend.tiny_models import hf_model, state_of


@pytest.fixture(autouse=True)
def no_gemv_kernel(monkeypatch):
    monkeypatch.setattr(dequant_cache, "gemv_covers", lambda x: False)


CASES = [
    ((13, 37), 64, True),
    ((13, 37), 64, False),
    ((1, 7), 32, True),
    ((96, 130), 128, False),
    ((64, 64), 256, True),
    ((5, 1000), 4096, True),
]


@pytest.mark.parametrize("shape, blocksize, double_quant", CASES)
def test_cached_linear_matches_the_spec(rng, shape, blocksize, double_quant):
    _, t = quantized(rng, shape, blocksize, double_quant)
    bias = rng.standard_normal(shape[0]).astype(np.float32)
    layer = NF4Linear.from_nf4(t, bias)
    spec = torch.from_numpy(nf4core.dequantize(t))  # (out, in), the executable spec
    cache = DequantCache(budget_bytes=1 << 30)
    for rows in (1, 3):
        x = torch.randn(rows, shape[1])
        with torch.no_grad(), cache.active():
            y = layer(x)
            y_functional = nf4_linear(x, layer.weight, layer.bias)
        assert torch.allclose(y, x @ spec.T + torch.from_numpy(bias), rtol=1e-5, atol=1e-5)
        assert torch.equal(y, y_functional)
    assert len(cache) == 1
    ((_, _, dense),) = cache._entries.values()
    assert np.array_equal(bits(dense), bits(spec))  # the cached weight is the spec, bit for bit


def test_budget_bounds_the_cache_and_the_rest_runs_per_call(rng):
    layers = [NF4Linear.from_nf4(quantized(rng, (16, 32))[1]) for _ in range(3)]
    one = 16 * 32 * 4
    cache = DequantCache(budget_bytes=2 * one)  # two of the three weights fit
    x = torch.randn(1, 32)
    with torch.no_grad(), cache.active():
        first = [layer(x) for layer in layers]
        second = [layer(x) for layer in layers]
    assert len(cache) == 2 and cache.used == 2 * one
    for a, b, layer in zip(first, second, layers):
        assert torch.equal(a, b)
        assert torch.allclose(a, x @ layer.dequantize().T, rtol=1e-5, atol=1e-6)
    assert len(DequantCache(budget_bytes=0)) == 0


def test_not_used_with_grad_on_or_a_path_forced_or_outside_the_block(rng):
    layer = NF4Linear.from_nf4(quantized(rng, (8, 32))[1])
    x = torch.randn(2, 32, requires_grad=True)
    cache = DequantCache(budget_bytes=1 << 20)
    with cache.active():
        layer(x).sum().backward()  # training: the weight must not stay dequantized
    assert len(cache) == 0 and x.grad is not None
    for forced in ("reference", "triton"):  # a forced path runs as forced, every call
        with torch.no_grad(), dispatch.force_path(forced), cache.active():
            assert cached_weight(layer.weight, torch.float32) is None
    assert len(cache) == 0
    with torch.no_grad():
        layer(x)
    assert len(cache) == 0


def test_a_weight_changed_in_place_is_dequantized_again(rng):
    _, t = quantized(rng, (8, 32), double_quant=False)
    layer = NF4Linear.from_nf4(t)
    cache = DequantCache(budget_bytes=1 << 20)
    x = torch.randn(1, 32)
    with torch.no_grad(), cache.active():
        before = layer(x)
        layer.packed.bitwise_xor_(0x11)  # every code changes
        after = layer(x)
    assert not torch.allclose(before, after)
    assert torch.allclose(after, x @ layer.dequantize().T, rtol=1e-5, atol=1e-6)
    assert cache.used == 8 * 32 * 4  # the stale copy was dropped


def test_budget_from_the_environment(monkeypatch):
    monkeypatch.setenv("NF4_QLORA_DEQUANT_CACHE_MB", "0.5")
    assert budget_from_env() == 1 << 19
    monkeypatch.setenv("NF4_QLORA_DEQUANT_CACHE_MB", "lots")
    with pytest.raises(ValueError, match="NF4_QLORA_DEQUANT_CACHE_MB"):
        budget_from_env()


def test_generation_gives_the_same_tokens_with_and_without_the_cache(monkeypatch):
    pytest.importorskip("transformers")
    hf, cfg = hf_model("llama")
    state = state_of(hf)
    model = CausalLM.from_state(cfg, state, quantize=True)
    prompt, sampling = [3, 17, 42, 5], SamplingConfig(max_new_tokens=8)
    cached = generate(model, prompt, sampling)
    rows = [r.tolist() for r in greedy_steps(model, [prompt, prompt[::-1]], 8)]
    monkeypatch.setenv("NF4_QLORA_DEQUANT_CACHE_MB", "0")
    assert generate(model, prompt, sampling) == cached
    assert [r.tolist() for r in greedy_steps(model, [prompt, prompt[::-1]], 8)] == rows
    with dispatch.force_path("reference"):
        assert generate(model, prompt, sampling) == cached
