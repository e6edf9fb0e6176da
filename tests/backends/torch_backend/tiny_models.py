"""Tiny random Llama-family models built with transformers (the oracle) and their nf4 twins."""

import numpy as np
import torch

from nf4core import ModelConfig

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
SHAPE = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def hf_model(arch: str, seed: int = 0, sliding_window: int | None = None):
    """(transformers model in float32 eval mode with randomised weights, our ModelConfig).
    `sliding_window` is for "mistral" only."""
    import transformers

    torch.manual_seed(seed)
    if arch == "llama":
        hf_cfg = transformers.LlamaConfig(
            **SHAPE,
            rope_theta=500000.0,
            rope_scaling=LLAMA3_ROPE,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
        )
        ours = ModelConfig(
            "llama",
            rope_theta=500000.0,
            rope_scaling=LLAMA3_ROPE,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            **SHAPE,
        )
        cls = transformers.LlamaForCausalLM
    elif arch == "mistral":
        common = dict(
            rope_theta=10000.0,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            sliding_window=sliding_window,
        )
        hf_cfg = transformers.MistralConfig(**SHAPE, **common)
        ours = ModelConfig("mistral", **common, **SHAPE)
        cls = transformers.MistralForCausalLM
    else:
        hf_cfg = transformers.Qwen2Config(
            **SHAPE, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True
        )
        ours = ModelConfig(
            "qwen2",
            rope_theta=10000.0,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            attention_bias=True,
            **SHAPE,
        )
        cls = transformers.Qwen2ForCausalLM
    hf_cfg._attn_implementation = "eager"
    model = cls(hf_cfg).eval()
    with torch.no_grad():  # larger than the init so every part of the network matters
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (0.5 if p.dim() == 1 else 1.0 / p.shape[-1] ** 0.5))
    return model, ours


def state_of(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
