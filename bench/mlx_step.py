"""A QLoRA training step of a small random Llama on the MLX backend, timed (shared by the benches)."""

from __future__ import annotations

import time

import mlx.core as mx
import numpy as np

from backends.engine import LoRASettings
from backends.mlx_backend.lora import apply_lora
from backends.mlx_backend.model import CausalLM
from backends.mlx_backend.train_step import Batch, TrainConfig, Trainer
from nf4core import ModelConfig


def small_config(hidden=512, layers=4, vocab=4096) -> ModelConfig:
    return ModelConfig(
        architecture="llama",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 256),
    )


def random_state(config: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    c, d = config, config.resolved_head_dim
    q, kv = c.num_attention_heads * d, c.num_key_value_heads * d

    def w(*shape):
        return (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)

    t = {
        "model.embed_tokens.weight": w(c.vocab_size, c.hidden_size),
        "model.norm.weight": np.ones(c.hidden_size, np.float32),
        "lm_head.weight": w(c.vocab_size, c.hidden_size),
    }
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}"
        t[f"{p}.input_layernorm.weight"] = np.ones(c.hidden_size, np.float32)
        t[f"{p}.post_attention_layernorm.weight"] = np.ones(c.hidden_size, np.float32)
        for name, shape in (
            ("q_proj", (q, c.hidden_size)),
            ("k_proj", (kv, c.hidden_size)),
            ("v_proj", (kv, c.hidden_size)),
            ("o_proj", (c.hidden_size, q)),
        ):
            t[f"{p}.self_attn.{name}.weight"] = w(*shape)
        t[f"{p}.mlp.gate_proj.weight"] = w(c.intermediate_size, c.hidden_size)
        t[f"{p}.mlp.up_proj.weight"] = w(c.intermediate_size, c.hidden_size)
        t[f"{p}.mlp.down_proj.weight"] = w(c.hidden_size, c.intermediate_size)
    return t


def step_tokens_per_second(
    config: ModelConfig,
    quantize: bool,
    batch: int,
    seq: int,
    steps: int = 3,
    compute_dtype: str = "auto",
) -> tuple[float, int]:
    """(tokens/s of a LoRA training step, peak bytes) with an NF4 (quantize) or dense base."""
    model = CausalLM.from_state(
        config, random_state(config), quantize=quantize, compute_dtype=compute_dtype
    )
    apply_lora(model, LoRASettings(r=16, alpha=32.0))
    trainer = Trainer(model, TrainConfig(max_grad_norm=1.0))
    tokens = np.random.default_rng(1).integers(0, config.vocab_size, size=(batch, seq + 1))
    b = Batch.from_tokens(tokens)
    trainer.train_step([b], 2e-4)  # compile + warm-up
    mx.reset_peak_memory()
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step([b], 2e-4)
    elapsed = time.perf_counter() - start
    return batch * seq * steps / elapsed, mx.get_peak_memory()
