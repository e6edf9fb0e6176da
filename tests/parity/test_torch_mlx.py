"""The torch and MLX backends on the same tiny NF4 model: identical dequantized weights, identical
initial adapters under identical PEFT names, and the same logits within float32 tolerance."""

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
mx = pytest.importorskip("mlx.core")

from backends.engine import LoRASettings  # noqa: E402
from backends.mlx_backend import CausalLM as MLXCausalLM  # noqa: E402
from backends.mlx_backend import apply_lora as mlx_apply_lora  # noqa: E402
from backends.mlx_backend import lora_state_dict as mlx_lora_state_dict  # noqa: E402
from backends.torch_backend import CausalLM, apply_lora, lora_state_dict  # noqa: E402
from tests.backends.torch_backend.test_train_step import CFG, tiny_state  # noqa: E402


def test_same_model_same_adapters_same_logits():
    tensors = tiny_state(seed=3)
    ours = CausalLM.from_state(CFG, tensors, quantize=True)
    theirs = MLXCausalLM.from_state(CFG, tensors, quantize=True, compute_dtype="float32")
    apply_lora(ours, LoRASettings(r=4, alpha=8.0, seed=11))
    mlx_apply_lora(theirs, LoRASettings(r=4, alpha=8.0, seed=11))
    a, b = lora_state_dict(ours), mlx_lora_state_dict(theirs)
    assert sorted(a) == sorted(b) and len(a) == 2 * 7 * CFG.num_hidden_layers
    for key, value in a.items():
        assert np.array_equal(value.numpy().view(np.uint32), b[key].view(np.uint32)), key
    ids = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 12))
    with torch.no_grad():
        got = ours(torch.from_numpy(ids)).numpy()
    want = np.array(theirs(mx.array(ids)))
    assert np.allclose(got, want, atol=1e-4, rtol=1e-4), np.abs(got - want).max()


def test_sliding_window_same_logits_and_cached_decoding():
    config = dataclasses.replace(CFG, architecture="mistral", sliding_window=4)
    tensors = tiny_state(seed=5)
    ours = CausalLM.from_state(config, tensors, quantize=True)
    theirs = MLXCausalLM.from_state(config, tensors, quantize=True, compute_dtype="float32")
    ids = np.random.default_rng(1).integers(0, config.vocab_size, (2, 13))
    with torch.no_grad():
        got = ours(torch.from_numpy(ids)).numpy()
        cache = ours.new_cache(2, 13)
        ours(torch.from_numpy(ids[:, :-1]), cache)
        got_step = ours(torch.from_numpy(ids[:, -1:]), cache).numpy()[:, 0]
    want = np.array(theirs(mx.array(ids)))
    assert np.allclose(got, want, atol=1e-4, rtol=1e-4), np.abs(got - want).max()
    mlx_cache = theirs.make_cache()
    theirs(mx.array(ids[:, :-1]), mlx_cache)
    want_step = np.array(theirs.last_logits(mx.array(ids[:, -1:]), mlx_cache))
    assert np.allclose(got_step, want_step, atol=1e-4, rtol=1e-4)
    full = CausalLM.from_state(dataclasses.replace(config, sliding_window=None), tensors)
    with torch.no_grad():
        unwindowed = full(torch.from_numpy(ids)).numpy()
    assert np.abs(unwindowed[:, 4:] - want[:, 4:]).max(-1).min() > 1e-2  # the window matters
