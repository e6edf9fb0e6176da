"""RoPE frequencies, computed once for both backends, against transformers' own as the oracle."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import nf4core
from nf4core.rope import inverse_frequencies

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


@pytest.mark.parametrize("theta", [10000.0, 500000.0])
@pytest.mark.parametrize("scaling", [None, {"rope_type": "linear", "factor": 4.0}, LLAMA3])
def test_inverse_frequencies_match_transformers(theta, scaling):
    config = nf4core.ModelConfig(
        "llama",
        vocab_size=64,
        hidden_size=256,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        rope_theta=theta,
        rope_scaling=scaling,
    )
    hf_config = transformers.AutoConfig.for_model(**config.to_hf_config())
    rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(config=hf_config)
    ours = inverse_frequencies(config)
    assert ours.dtype == np.float32 and ours.shape == (64,)
    # transformers computes in float32, we in float64 rounded once: a few ulps apart at most
    np.testing.assert_allclose(ours, rotary.inv_freq.numpy(), rtol=1e-6, atol=0)
    if scaling is not None:  # the scaling is applied, not ignored
        plain = inverse_frequencies(dataclasses.replace(config, rope_scaling=None))
        assert not np.array_equal(ours, plain)
