"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM) with Hugging Face module names."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nf4core import ModelConfig, ModelSource
from nf4core.rope import inverse_frequencies
from nf4core.sources.layout import attention_has_bias
from nf4core.strict_tensors import StrictTensors

from ...engine import SourceTensors
from ..cpu_matmul import frozen_matmul_dtype
from ..kv_cache import KVCache
from .attention import Attention
from .chunked_loss import chunked_head_loss
from .layer_checkpoint import checkpointed
from .layers import MLP, RMSNorm, make_linear
from .masks import attention_mask
from .rope import rope_cos_sin

ATTENTION_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")


class DecoderLayer(nn.Module):
    def __init__(
        self,
        self_attn: Attention,
        mlp: MLP,
        input_layernorm: RMSNorm,
        post_attention_layernorm: RMSNorm,
    ) -> None:
        super().__init__()
        self.self_attn, self.mlp = self_attn, mlp
        self.input_layernorm, self.post_attention_layernorm = (
            input_layernorm,
            post_attention_layernorm,
        )

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:  # (B, T, C)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(
        self, embed_tokens: nn.Embedding, layers: list[DecoderLayer], norm: RMSNorm
    ) -> None:
        super().__init__()
        self.embed_tokens, self.layers, self.norm = embed_tokens, nn.ModuleList(layers), norm


class CausalLM(nn.Module):
    """A Llama-family causal LM. Linear layers of the blocks are NF4Linear (frozen) unless built dense;
    embeddings, norms and lm_head stay dense. Module names match Hugging Face's, so LoRA names and
    PEFT keys do too. Computes in `compute_dtype` (BF16 on GPUs, FP32 on CPUs by default)."""

    def __init__(
        self, config: ModelConfig, model: Decoder, lm_head: nn.Module, compute_dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.config, self.model, self.lm_head = config, model, lm_head
        self.compute_dtype = compute_dtype
        self.gradient_checkpointing = False
        self.chunked_loss = False  # `loss` runs the LM head and cross-entropy in chunks of rows
        self.register_buffer(
            "inv_freq", torch.from_numpy(inverse_frequencies(config)), persistent=False
        )

    @classmethod
    def from_state(
        cls,
        config: ModelConfig,
        tensors: Mapping[str, object],
        quantize: bool = True,
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype = torch.float32,
        method: str = "absmax",
        base_dtype: torch.dtype | None = None,
    ) -> CausalLM:
        """Build from Hugging Face-named tensors (numpy arrays, torch tensors or nf4core.NF4Tensor).

        Block linears given as NF4Tensor are used as they are; dense ones are quantized one at a time
        when `quantize` by `method` (else kept dense in `compute_dtype`, their values first rounded
        to `base_dtype` when given). Tied embeddings ignore lm_head.weight. Every tensor must be
        one the config describes and every one is used (biases included), else one ModelLoadError
        line names the unexpected and missing ones.
        """
        get = StrictTensors(tensors, config)
        get.check_names()
        dense = dict(dtype=compute_dtype)
        heads, kv, hd = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.resolved_head_dim,
        )

        def lin(name: str, bias: bool) -> nn.Module:
            """The frozen linear `name`; its bias (a dense tensor) is added after the matmul."""
            b = _array(get.get(f"{name}.bias")) if bias else None
            return make_linear(
                get.get(f"{name}.weight"),
                b,
                quantize,
                blocksize,
                double_quant,
                compute_dtype,
                method,
                base_dtype,
            )

        def tensor(name: str) -> torch.Tensor:
            return torch.from_numpy(_array(get.get(name))).to(compute_dtype)

        layers = []
        for i in range(config.num_hidden_layers):
            p = f"model.layers.{i}."
            attn = Attention(
                *(lin(f"{p}self_attn.{n}", attention_has_bias(config, n)) for n in ATTENTION_PROJ),
                heads,
                kv,
                hd,
                i,
            )
            mlp = MLP(*(lin(f"{p}mlp.{n}", config.mlp_bias) for n in MLP_PROJ))
            norms = (
                RMSNorm(tensor(f"{p}{n}.weight"), config.rms_norm_eps)
                for n in ("input_layernorm", "post_attention_layernorm")
            )
            layers.append(DecoderLayer(attn, mlp, *norms))
        embed = nn.Embedding.from_pretrained(tensor("model.embed_tokens.weight"))
        decoder = Decoder(embed, layers, RMSNorm(tensor("model.norm.weight"), config.rms_norm_eps))
        lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, **dense)
        if config.tie_word_embeddings:  # a saved lm_head.weight is then the same tensor
            lm_head.weight = embed.weight  # one tensor, as in the checkpoint
        else:
            lm_head.weight = nn.Parameter(tensor("lm_head.weight"))
        lm_head.requires_grad_(False)
        get.check_all_used()
        return cls(config, decoder, lm_head, compute_dtype)

    @classmethod
    def from_source(
        cls,
        source: ModelSource,
        quantize: bool = True,
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype = torch.float32,
        method: str = "absmax",
        base_dtype: torch.dtype | None = None,
    ) -> CausalLM:
        """Build from `nf4core.open_model(path)`: tensors are read (and quantized) one at a time; NF4
        weights of a bitsandbytes directory are used without requantizing."""
        return cls.from_state(
            source.config,
            SourceTensors(source),
            quantize,
            blocksize,
            double_quant,
            compute_dtype,
            method,
            base_dtype,
        )

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | None = None,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids (B, T) -> final normalised hidden states (B, T, C) in the compute dtype.

        position_ids (B, T) restart RoPE positions per packed example; segment_ids (B, T) (0 on
        padding) keep attention within an example. A sliding window (config.sliding_window) applies
        within each example and across cached positions."""
        t = input_ids.shape[1]
        past = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + t, device=input_ids.device)  # (T,)
        cos, sin = rope_cos_sin(self.inv_freq, position_ids, self.compute_dtype)  # (..., T, D)
        mask = attention_mask(t, past, self.config.sliding_window, input_ids.device, segment_ids)
        x = self.model.embed_tokens(input_ids).to(self.compute_dtype)
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpointed(layer, x, cos, sin, cache, mask)
            else:
                x = layer(x, cos, sin, cache, mask)
        if cache is not None:
            cache.advance(t)
        return self.model.norm(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | None = None,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, vocab) in the compute dtype (see `hidden_states`)."""
        return self.lm_head(self.hidden_states(input_ids, cache, position_ids, segment_ids))

    def loss(
        self,
        input_ids: torch.Tensor,
        loss_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed next-token cross-entropy (float32) and the number of counted targets, as
        `causal_lm_loss(self(input_ids, ...), ...)`; with `chunked_loss` (and a frozen plain LM
        head) the full logits are never held (model/chunked_loss.py)."""
        head = self.lm_head
        if (
            self.chunked_loss
            and isinstance(head, nn.Linear)
            and head.bias is None
            and not head.weight.requires_grad
        ):
            hidden = self.hidden_states(input_ids, None, position_ids, segment_ids)
            mask = target_mask(input_ids, loss_mask, segment_ids)
            matmul = frozen_matmul_dtype(hidden, mask.numel())
            loss = chunked_head_loss(hidden, head.weight, input_ids, mask, matmul_dtype=matmul)
            return loss, mask.sum()
        logits = self(input_ids, position_ids=position_ids, segment_ids=segment_ids)
        return causal_lm_loss(logits, input_ids, loss_mask, segment_ids)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        c = self.config
        return KVCache(
            c.num_hidden_layers,
            batch,
            c.num_key_value_heads,
            c.resolved_head_dim,
            max_len,
            self.compute_dtype,
            self.inv_freq.device,
        )


def _array(value: object) -> np.ndarray:
    """A float32 numpy copy (sources may hand out read-only views)."""
    if isinstance(value, torch.Tensor):
        return value.detach().float().cpu().numpy()
    return np.array(value, dtype=np.float32)


def target_mask(
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, T-1) bool: which next-token predictions count. Target t counts where loss_mask[t] (all but
    the first token without a mask) and, in packed rows, where t and t-1 are in the same example."""
    if loss_mask is None:
        mask = torch.ones_like(input_ids[:, 1:], dtype=torch.bool)
    else:
        mask = loss_mask[:, 1:].bool()
    if segment_ids is not None:
        mask = mask & (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] != 0)
    return mask


def causal_lm_loss(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy (float32) and the number of counted targets.

    logits (B, T, V), input_ids (B, T); loss_mask (B, T) marks the tokens that count as targets
    (position t is predicted from t-1; position 0 never counts); with segment_ids (B, T), the first
    token of a packed example is not predicted from the previous example."""
    targets = input_ids[:, 1:]  # (B, T-1)
    mask = target_mask(input_ids, loss_mask, segment_ids)
    losses = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="none"
    )
    return torch.where(mask.flatten(), losses, 0.0).sum(), mask.sum()
