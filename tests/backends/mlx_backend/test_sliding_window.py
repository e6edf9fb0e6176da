"""Mistral's sliding window in the MLX model: transformers' logits and cached decoding past the
window, each also run with the window dropped to show that it matters."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
pytest.importorskip("transformers")

from backends.mlx_backend.attention import causal_mask
from backends.mlx_backend.model import CausalLM

from .test_model import _hf_logits, _quantized_copy
from .tiny_models import random_tensors, tiny_config

WINDOW = 4


def windowed_and_full(seed: int):
    """(the NF4 model with the window, the same weights without it, dequantized weights, config)."""
    config = tiny_config("mistral", sliding_window=WINDOW)
    nf4, dense = _quantized_copy(random_tensors(config, seed=seed))
    full = CausalLM.from_state(dataclasses.replace(config, sliding_window=None), nf4)
    return CausalLM.from_state(config, nf4), full, dense, config


def test_mask_follows_transformers_window_rule():
    mask = np.array(causal_mask(3, 5, mx.float32, WINDOW))  # queries at 5, 6, 7 over keys 0..7
    for row, i in enumerate(range(5, 8)):
        assert np.flatnonzero(mask[row] == 0).tolist() == list(range(i - WINDOW + 1, i + 1))
    assert causal_mask(1, 3, mx.float32, WINDOW) is None  # one query over 4 keys


def test_logits_match_transformers_and_the_window_matters():
    model, full, dense, config = windowed_and_full(seed=5)
    tokens = np.random.default_rng(6).integers(0, config.vocab_size, size=(2, 14))
    got = np.array(model(mx.array(tokens)))
    np.testing.assert_allclose(got, _hf_logits(config, dense, tokens), rtol=1e-4, atol=1e-4)
    unwindowed = np.array(full(mx.array(tokens)))
    np.testing.assert_allclose(unwindowed[:, :WINDOW], got[:, :WINDOW], atol=1e-5)
    assert np.abs(unwindowed[:, WINDOW:] - got[:, WINDOW:]).max(-1).min() > 1e-2


def test_cached_decoding_past_the_window_equals_the_full_forward():
    model, full, _, config = windowed_and_full(seed=7)
    tokens = mx.array(np.random.default_rng(8).integers(0, config.vocab_size, size=(1, 13)))
    want = np.array(model(tokens))
    cache = model.make_cache()
    parts = [model(tokens[:, :3], cache), model(tokens[:, 3:7], cache)]  # a prefill, a chunk
    parts += [model(tokens[:, i : i + 1], cache) for i in range(7, 13)]  # single tokens
    stepped = np.array(mx.concatenate(parts, axis=1))
    np.testing.assert_allclose(stepped, want, rtol=1e-4, atol=1e-4)
    last = model.last_logits(tokens[:, -1:], _cache_of(model, tokens[:, :-1]))
    np.testing.assert_allclose(np.array(last), want[:, -1], rtol=1e-4, atol=1e-4)
    assert np.abs(np.array(full(tokens))[:, -1] - stepped[:, -1]).max() > 1e-2


def _cache_of(model: CausalLM, tokens: mx.array):
    cache = model.make_cache()
    model(tokens, cache)
    return cache
