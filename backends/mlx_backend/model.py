"""The Llama-family decoder in MLX (Llama 2/3, Mistral, Qwen2, SmolLM, TinyLlama) with NF4 linears.

Module paths equal Hugging Face's parameter names (model.layers.0.self_attn.q_proj, lm_head, ...), so
adapters are named and seeded as in the torch backend and exported under PEFT's keys.
"""

from __future__ import annotations

import numpy as np

import nf4core
from nf4core import ModelConfig, NF4Tensor
from nf4core.sources.layout import attention_has_bias
from nf4core.strict_tensors import StrictTensors

from ._mlx import mx, mx_dtype, nn
from .attention import Attention, KVCache, causal_mask, segment_mask
from .dispatch import default_compute_dtype
from .lora import LoRALinear
from .nf4_linear import NF4Linear
from .rope import RoPE

ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def __call__(self, x: mx.array) -> mx.array:  # SwiGLU
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, rope: RoPE) -> None:
        super().__init__()
        c = config
        self.self_attn = Attention(
            c.hidden_size,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.resolved_head_dim,
            c.attention_bias,
            rope,
        )
        self.mlp = MLP(c.hidden_size, c.intermediate_size)
        self.input_layernorm = nn.RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(c.hidden_size, eps=c.rms_norm_eps)

    def __call__(
        self,
        x: mx.array,
        mask: mx.array | None,
        cache: KVCache | None = None,
        positions: mx.array | None = None,
    ):
        h = x + self.self_attn(self.input_layernorm(x), mask, cache, positions)
        return h + self.mlp(self.post_attention_layernorm(h))


class DecoderStack(nn.Module):
    """Hugging Face's inner `model`: embeddings, layers, final norm."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        rope = RoPE(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [DecoderLayer(config, rope) for _ in range(config.num_hidden_layers)]
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.sliding_window = config.sliding_window  # Mistral; None attends to every earlier key

    def __call__(
        self,
        tokens: mx.array,
        cache: list[KVCache] | None = None,
        positions: mx.array | None = None,
        segments: mx.array | None = None,
    ) -> mx.array:
        """tokens (B, T) -> hidden states (B, T, C). Packed rows give `positions` (B, T), which
        restart per example, and `segments` (B, T) (1, 2, ... per example, 0 on padding), which keep
        attention within an example."""
        h = self.embed_tokens(tokens)  # (B, T, C)
        offset = 0 if cache is None else cache[0].offset
        if segments is not None:
            if cache is not None:
                raise ValueError("packed rows (segments) cannot be combined with a KV cache")
            mask = segment_mask(segments, h.dtype, self.sliding_window)
        else:
            mask = causal_mask(tokens.shape[1], offset, h.dtype, self.sliding_window)
        keys = self._dropout_keys()
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and cache is None:
                h = _checkpointed(layer, h, mask, keys[i], positions)
            else:
                layer_cache = None if cache is None else cache[i]
                h = _with_dropout_key(layer, keys[i], h, mask, layer_cache, positions)
        return self.norm(h)

    def _dropout_keys(self) -> list[mx.array | None]:
        """One key per block from the global generator when some LoRA dropout is active."""
        active = self.training and any(
            isinstance(m, LoRALinear) and m.dropout_p > 0 for _, m in self.named_modules()
        )
        if not active:
            return [None] * len(self.layers)
        base = mx.random.randint(0, 2**31 - 1, shape=(2,), dtype=mx.uint32)
        return list(mx.random.split(base, len(self.layers)))


def _with_dropout_key(layer: nn.Module, key: mx.array | None, *args) -> mx.array:
    loras = [m for _, m in layer.named_modules() if isinstance(m, LoRALinear)]
    sub = [None] * len(loras) if key is None else list(mx.random.split(key, max(len(loras), 1)))
    for module, k in zip(loras, sub):
        module.set_dropout_key(k)
    try:
        return layer(*args)
    finally:
        for module in loras:
            module.set_dropout_key(None)


def _checkpointed(
    layer: nn.Module,
    h: mx.array,
    mask: mx.array | None,
    key: mx.array | None,
    positions: mx.array | None = None,
) -> mx.array:
    """Run one block under mx.checkpoint: its activations are recomputed in the backward pass,
    with the same dropout masks (drawn from `key`, an input of the checkpointed function)."""

    def run(params, x, *key_arg):
        layer.update(params)
        key_in = mx.stop_gradient(key_arg[0]) if key_arg else None  # keys have no gradient
        return _with_dropout_key(layer, key_in, x, mask, None, positions)

    key_args = () if key is None else (key,)
    return mx.checkpoint(run)(layer.trainable_parameters(), h, *key_args)


class CausalLM(nn.Module):
    """A causal language model; `__call__(tokens (B, T), cache, positions, segments)` returns logits
    (B, T, vocab) (see `DecoderStack.__call__` for packed rows)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DecoderStack(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def __call__(
        self,
        tokens: mx.array,
        cache: list[KVCache] | None = None,
        positions: mx.array | None = None,
        segments: mx.array | None = None,
    ) -> mx.array:
        return self.head(self.model(tokens, cache, positions, segments))

    def last_logits(self, tokens: mx.array, cache: list[KVCache]) -> mx.array:
        """Logits (B, vocab) of the last position only: the LM head on one token per row."""
        return self.head(self.model(tokens, cache)[:, -1])

    def head(self, h: mx.array) -> mx.array:
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.model.gradient_checkpointing = enabled

    def make_cache(self) -> list[KVCache]:
        return KVCache.for_model(self.config.num_hidden_layers)

    @classmethod
    def from_state(
        cls,
        config: ModelConfig,
        tensors: dict,
        quantize: bool = True,
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: str = "auto",
        method: str = "absmax",
        base_dtype: str | None = None,
    ) -> CausalLM:
        """Build from Hugging Face-named tensors (numpy arrays, or NF4Tensors for the linears).

        Dense linear weights are quantized with nf4core (one tensor at a time, by `method`) when
        `quantize`, else kept dense, rounded to `base_dtype` (when given) then to `compute_dtype`;
        embeddings, norms and lm_head stay dense in `compute_dtype` ("auto": bfloat16 on a Metal
        GPU, float32 on the CPU); activations follow that dtype. Every loaded module is frozen.
        Every tensor must be one the config describes and every one is used (biases included),
        else one ModelLoadError line names the unexpected and missing ones.
        """
        dtype = mx_dtype(default_compute_dtype() if compute_dtype == "auto" else compute_dtype)
        get = StrictTensors(tensors, config)
        get.check_names()
        model = cls(config)

        def dense(name: str) -> mx.array:
            value = get.get(name)
            if isinstance(value, NF4Tensor):
                value = nf4core.dequantize(value, np.float32)
            return mx.array(np.asarray(value, dtype=np.float32)).astype(dtype)

        def linear(prefix: str, bias: bool) -> nn.Module:
            """The frozen linear `prefix`; its bias (dense, float32) is added after the matmul."""
            b = mx.array(np.asarray(get.get(f"{prefix}.bias"), np.float32)) if bias else None
            value = get.get(f"{prefix}.weight")
            if isinstance(value, NF4Tensor):
                return NF4Linear.from_nf4(value, b)
            if quantize:
                layer = NF4Linear.from_dense(
                    np.asarray(value, dtype=np.float32), None, blocksize, double_quant, method
                )
                return layer if b is None else NF4Linear(layer.nf4, b)
            out_f, in_f = value.shape
            layer = nn.Linear(in_f, out_f, bias=bias)
            weight = mx.array(np.asarray(value, dtype=np.float32))
            if base_dtype is not None:
                weight = weight.astype(mx_dtype(base_dtype))
            layer.weight = weight.astype(dtype)
            if bias:
                layer.bias = b.astype(dtype)
            return layer

        stack = model.model
        stack.embed_tokens.weight = dense("model.embed_tokens.weight")
        stack.norm.weight = dense("model.norm.weight")
        for i, layer in enumerate(stack.layers):
            p = f"model.layers.{i}"
            layer.input_layernorm.weight = dense(f"{p}.input_layernorm.weight")
            layer.post_attention_layernorm.weight = dense(f"{p}.post_attention_layernorm.weight")
            for mod_name in ATTENTION_LINEARS:
                bias = attention_has_bias(config, mod_name)
                setattr(layer.self_attn, mod_name, linear(f"{p}.self_attn.{mod_name}", bias))
            for mod_name in MLP_LINEARS:
                setattr(layer.mlp, mod_name, linear(f"{p}.mlp.{mod_name}", config.mlp_bias))
        if not config.tie_word_embeddings:
            model.lm_head.weight = dense("lm_head.weight")
        get.check_all_used()
        model.freeze()
        return model
