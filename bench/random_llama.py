"""Random weights for a Llama-architecture benchmark model (HF tensor names, float32)."""

from __future__ import annotations

import numpy as np

import nf4core


def random_llama_state(cfg: nf4core.ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Every tensor of `cfg`'s model: linears ~ N(0, 1/in), embeddings ~ N(0, 0.02^2), norms 1."""
    rng = np.random.default_rng(seed)
    c, f = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * cfg.resolved_head_dim
    state = {
        "model.embed_tokens.weight": rng.standard_normal((cfg.vocab_size, c), np.float32) * 0.02,
        "model.norm.weight": np.ones(c, np.float32),
    }
    if not cfg.tie_word_embeddings:
        state["lm_head.weight"] = rng.standard_normal((cfg.vocab_size, c), np.float32) * 0.02
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        for name, shape in [
            ("self_attn.q_proj", (c, c)),
            ("self_attn.k_proj", (kv, c)),
            ("self_attn.v_proj", (kv, c)),
            ("self_attn.o_proj", (c, c)),
            ("mlp.gate_proj", (f, c)),
            ("mlp.up_proj", (f, c)),
            ("mlp.down_proj", (c, f)),
        ]:
            state[p + name + ".weight"] = rng.standard_normal(shape, np.float32) / np.sqrt(shape[1])
        state[p + "input_layernorm.weight"] = np.ones(c, np.float32)
        state[p + "post_attention_layernorm.weight"] = np.ones(c, np.float32)
    return state
