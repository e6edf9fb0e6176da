"""Tiny Llama-family configs and random Hugging Face-named weights for the MLX backend tests."""

from __future__ import annotations

import numpy as np

from nf4core import ModelConfig


def tiny_config(architecture: str = "llama", **overrides) -> ModelConfig:
    values = {
        "architecture": architecture,
        "vocab_size": 97,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 256,
    }
    if architecture == "qwen2":
        values.update(attention_bias=True, tie_word_embeddings=True, rope_theta=1e6)
    values.update(overrides)
    return ModelConfig(**values)


def random_tensors(config: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    c, d = config, config.resolved_head_dim

    def w(*shape, scale=None):
        scale = scale if scale is not None else 1.0 / np.sqrt(shape[-1])
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    t = {
        "model.embed_tokens.weight": w(c.vocab_size, c.hidden_size, scale=0.5),
        "model.norm.weight": (1 + 0.1 * rng.standard_normal(c.hidden_size)).astype(np.float32),
    }
    if not c.tie_word_embeddings:
        t["lm_head.weight"] = w(c.vocab_size, c.hidden_size)
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            t[f"{p}.{norm}.weight"] = (1 + 0.1 * rng.standard_normal(c.hidden_size)).astype(
                np.float32
            )
        q, kv = c.num_attention_heads * d, c.num_key_value_heads * d
        for name, out_f, in_f in (
            ("q_proj", q, c.hidden_size),
            ("k_proj", kv, c.hidden_size),
            ("v_proj", kv, c.hidden_size),
            ("o_proj", c.hidden_size, q),
        ):
            t[f"{p}.self_attn.{name}.weight"] = w(out_f, in_f)
            if c.attention_bias and name != "o_proj":
                t[f"{p}.self_attn.{name}.bias"] = w(out_f, scale=0.1)
        t[f"{p}.mlp.gate_proj.weight"] = w(c.intermediate_size, c.hidden_size)
        t[f"{p}.mlp.up_proj.weight"] = w(c.intermediate_size, c.hidden_size)
        t[f"{p}.mlp.down_proj.weight"] = w(c.hidden_size, c.intermediate_size)
    return t
