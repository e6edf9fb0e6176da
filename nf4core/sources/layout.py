"""The tensors a Llama-family checkpoint must hold, by Hugging Face name, with their shapes."""

from __future__ import annotations

import re

from ..model_config import ModelConfig

LINEAR_MODULES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
_LINEAR_WEIGHT = re.compile(
    r"model\.layers\.\d+\.({})\.weight".format("|".join(re.escape(m) for m in LINEAR_MODULES))
)


def is_quantized_linear(name: str) -> bool:
    """True for the attention and MLP projection weights, the tensors stored as NF4."""
    return _LINEAR_WEIGHT.fullmatch(name) is not None


def attention_has_bias(config: ModelConfig, proj: str) -> bool:
    """Whether attention projection `proj` (q_proj, k_proj, v_proj, o_proj) has a bias: Qwen2's
    q/k/v; all four for a Llama with attention_bias (transformers' LlamaAttention)."""
    if not config.attention_bias:
        return False
    return proj != "o_proj" or config.architecture != "qwen2"


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the model needs, in checkpoint order, with its shape (out, in) for weights.

    `lm_head.weight` is absent when the embeddings are tied.
    """
    h, inter, hd = config.hidden_size, config.intermediate_size, config.resolved_head_dim
    q_out, kv_out = config.num_attention_heads * hd, config.num_key_value_heads * hd
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, h)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "self_attn.q_proj.weight"] = (q_out, h)
        shapes[p + "self_attn.k_proj.weight"] = (kv_out, h)
        shapes[p + "self_attn.v_proj.weight"] = (kv_out, h)
        shapes[p + "self_attn.o_proj.weight"] = (h, q_out)
        for proj, out in (("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out), ("o_proj", h)):
            if attention_has_bias(config, proj):
                shapes[p + f"self_attn.{proj}.bias"] = (out,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "mlp.gate_proj.weight"] = (inter, h)
        shapes[p + "mlp.up_proj.weight"] = (inter, h)
        shapes[p + "mlp.down_proj.weight"] = (h, inter)
        if config.mlp_bias:
            shapes[p + "mlp.gate_proj.bias"] = (inter,)
            shapes[p + "mlp.up_proj.bias"] = (inter,)
            shapes[p + "mlp.down_proj.bias"] = (h,)
    shapes["model.norm.weight"] = (h,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    return shapes
