"""Decode steps (one new token per row, after the prefill) on the CPU GEMV kernel without the module
tree: the module path's numbers (`CausalLM.hidden_states` + the LM head) in far fewer calls.

Through the modules, a batch-1 decode step of the default model spent as long in Python, ~100 small
torch ops per layer (module calls, RMSNorm, RoPE recomputed per layer for q and for k, the KV cache's
slicing) and the wrapper of 7 NF4 linear calls per layer as in the kernel itself (BENCHMARKS.md,
decoding). Here a float32 layer of plain NF4 linears (`_FusedLayer`) is four kernel calls
(cpu_gemv.DecodeProjection): RMSNorm + q/k/v (the three weights as one group, x rearranged once) +
RoPE from a table of every position made once per decode + k and v written into the KV cache;
o_proj added to the residual stream in place; RMSNorm + gate/up; down_proj added to the residual;
between them the same SDPA call and SiLU(gate) * up as the module path. Each float op is the module
path's, rounded alike, except the order of the RMSNorm's sum of squares (and each GEMV column is
summed as a call of its own would). Layers with LoRA adapters (added per output slice as LoRALinear
adds them), biases or a bfloat16 compute dtype take `_Layer`: the same steps as torch ops around
GEMV groups, bit for bit the module path's; so do float32 layers when the projection call failed
its self-check (self_check.cpu_decode_trusted: one warning). test_fast_decode.py compares both with
the module path.

Taken when every block is the plain Llama layout on NF4 linears (DoRA, dense or sharded linears
keep the module path), on the CPU in a dtype the kernel takes, and the kernel covers the rows now
(`dequant_cache.gemv_covers`: auto mode after its self-check, or forced; so no compiler, a failed
self-check, NF4_KERNELS=reference or more rows than the kernel takes keep the module path too).
NF4_QLORA_FAST_DECODE=0 turns it off (the module path, for comparison).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import dequant_cache, dispatch, self_check
from .cpu_gemv import DecodeProjection, GemvGroup
from .kv_cache import KVCache
from .lora import LoRALinear
from .model import CausalLM
from .model.attention import Attention
from .model.layers import MLP, RMSNorm
from .model.llama import DecoderLayer
from .model.masks import attention_mask
from .model.rope import rope_cos_sin
from .nf4_linear import NF4Linear


def enabled() -> bool:
    """NF4_QLORA_FAST_DECODE: "1" (default) or "0"."""
    raw = os.environ.get("NF4_QLORA_FAST_DECODE", "1")
    if raw not in ("0", "1"):
        raise ValueError(f"NF4_QLORA_FAST_DECODE must be 0 or 1, got {raw!r}")
    return raw == "1"


def _nf4_base(m: nn.Module) -> NF4Linear | None:
    """The NF4Linear a projection computes with, if the fast path can run it: a plain NF4Linear, or
    a LoRALinear over one (LoRA, not DoRA; dropout is off in eval mode). Subclasses (the sharded
    linear) are not taken."""
    if type(m) is NF4Linear:
        return m
    if (
        type(m) is LoRALinear
        and type(m.base) is NF4Linear
        and m.lora_magnitude_vector is None
        and not m.training
    ):
        return m.base
    return None


class _Projections:
    """Linears that read the same input as one kernel call; biases and LoRA terms are then added to
    their slices of the joint output, in LoRALinear's order: (x W^T + bias) + scale * (x A^T) B^T."""

    def __init__(self, modules: Sequence[nn.Module], bases: Sequence[NF4Linear]) -> None:
        self.group = GemvGroup([b.weight for b in bases])
        self.extras = []  # (start, end, bias or None, LoRALinear or None)
        start = 0
        for module, base in zip(modules, bases, strict=True):
            end = start + base.out_features
            lora = module if module is not base else None
            if base.bias is not None or lora is not None:
                self.extras.append((start, end, base.bias, lora))
            start = end

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # (B, in) -> (B, sum of out)
        y = self.group(x)
        for start, end, bias, lora in self.extras:
            part = y[:, start:end]
            if bias is not None:
                part += bias.to(y.dtype)
            if lora is not None:
                a = lora.lora_A.weight.to(x.dtype)
                b = lora.lora_B.weight.to(x.dtype)
                part += F.linear(F.linear(x, a), b) * lora.scale
        return y


def _rms_norm(x: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
    """RMSNorm.forward's ops, without the module call."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.eps)
    return norm.weight * h.to(x.dtype)


class _Layer:
    """A layer through torch ops around GEMV groups: any compute dtype, biases, LoRA adapters."""

    def __init__(self, layer: DecoderLayer, bases: list[NF4Linear], decoder: FastDecoder) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.norm1, self.norm2 = layer.input_layernorm, layer.post_attention_layernorm
        self.keys = decoder.cache.keys[attn.layer_index]
        self.values = decoder.cache.values[attn.layer_index]
        modules = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj]
        self.qkv = _Projections(modules[:3], bases[:3])
        self.o = _Projections(modules[3:], bases[3:4])
        mlp_modules = [mlp.gate_proj, mlp.up_proj, mlp.down_proj]
        self.gate_up = _Projections(mlp_modules[:2], bases[4:6])
        self.down = _Projections(mlp_modules[2:], bases[6:])
        self.intermediate = bases[4].out_features
        self.decoder = decoder

    def run(self, x: torch.Tensor, p: int, mask: torch.Tensor | None) -> None:
        """Adds the layer's attention and MLP outputs to the residual stream x (B, C) in place."""
        dec = self.decoder
        b, h, kv, d = x.shape[0], dec.heads, dec.kv_heads, dec.head_dim
        qk_width, half = (h + kv) * d, d // 2
        qkv = self.qkv(_rms_norm(x, self.norm1))  # (B, (H + 2 H_kv) D)
        qk = qkv[:, :qk_width].view(b, h + kv, d)
        qk = qk * dec.cos[p] + torch.cat([qk[..., half:], qk[..., :half]], dim=-1) * dec.sin[p]
        self.keys[:, :, p] = qk[:, h:]
        self.values[:, :, p] = qkv[:, qk_width:].view(b, kv, d)
        out = F.scaled_dot_product_attention(
            qk[:, :h, None],  # (B, H, 1, D)
            self.keys[:, :, : p + 1],
            self.values[:, :, : p + 1],
            attn_mask=mask,
            enable_gqa=kv != h,
        )
        x += self.o(out.reshape(b, h * d))
        gate_up = self.gate_up(_rms_norm(x, self.norm2))
        i = self.intermediate
        x += self.down(F.silu(gate_up[:, :i]) * gate_up[:, i:])


class _FusedLayer:
    """A float32 layer of plain NF4 linears in four kernel calls (cpu_gemv.DecodeProjection):
    RMSNorm + q/k/v + RoPE + the KV cache write; o_proj added to the residual; RMSNorm + gate/up;
    down_proj added to the residual. SDPA and SiLU(gate) * up stay torch's."""

    def __init__(self, layer: DecoderLayer, bases: list[NF4Linear], decoder: FastDecoder) -> None:
        attn, x = layer.self_attn, decoder.x
        rows, h, kv, d = x.shape[0], decoder.heads, decoder.kv_heads, decoder.head_dim
        self.keys = decoder.cache.keys[attn.layer_index]
        self.values = decoder.cache.values[attn.layer_index]
        self.heads, self.kv_heads = h, kv
        qkv = GemvGroup([b.weight for b in bases[:3]])
        self.qkv_out = torch.empty(rows, qkv.out_features)
        self.qkv = DecodeProjection(
            qkv,
            self.qkv_out,
            accumulate=False,
            norm=_norm_args(layer.input_layernorm),
            rope=(decoder.cos, decoder.sin, h + kv, kv),
            cache=(self.keys, self.values),
        )
        self.q = self.qkv_out[:, : h * d].view(rows, h, 1, d)
        self.o = DecodeProjection(GemvGroup([bases[3].weight]), x, accumulate=True)
        gate_up = GemvGroup([b.weight for b in bases[4:6]])
        self.gate_up_out = torch.empty(rows, gate_up.out_features)
        self.gate_up = DecodeProjection(
            gate_up, self.gate_up_out, False, norm=_norm_args(layer.post_attention_layernorm)
        )
        i = bases[4].out_features
        self.gate, self.up = self.gate_up_out[:, :i], self.gate_up_out[:, i:]
        self.act = torch.empty(rows, i)
        self.down = DecodeProjection(GemvGroup([bases[6].weight]), x, accumulate=True)

    def run(self, x: torch.Tensor, p: int, mask: torch.Tensor | None) -> None:
        self.qkv(x, p)
        out = F.scaled_dot_product_attention(
            self.q,
            self.keys[:, :, : p + 1],
            self.values[:, :, : p + 1],
            attn_mask=mask,
            enable_gqa=self.kv_heads != self.heads,
        )
        self.o(out.reshape(x.shape[0], -1).contiguous(), p)
        self.gate_up(x, p)
        torch.mul(F.silu(self.gate), self.up, out=self.act)
        self.down(self.act, p)


def _norm_args(norm: RMSNorm) -> tuple[torch.Tensor, float]:
    return norm.weight.detach().contiguous(), norm.eps


def _plain(modules: Sequence[nn.Module]) -> bool:
    """Plain NF4Linear modules without a bias: what a _FusedLayer computes."""
    return all(type(m) is NF4Linear and m.bias is None for m in modules)


def _layer_bases(layer: nn.Module) -> list[NF4Linear] | None:
    """The 7 NF4 bases of a plain decoder layer (q, k, v, o, gate, up, down), or None."""
    if not (
        type(layer) is DecoderLayer
        and type(layer.self_attn) is Attention
        and type(layer.mlp) is MLP
        and type(layer.input_layernorm) is RMSNorm
        and type(layer.post_attention_layernorm) is RMSNorm
    ):
        return None
    bases = [_nf4_base(p) for p in _projections(layer)]
    if any(b is None for b in bases):
        return None
    if bases[4].out_features != bases[5].out_features:
        return None
    return bases


class FastDecoder:
    """`step(ids)`: ids (B, 1) -> logits (B, vocab) of the next position, advancing `cache` by one,
    as `last_logits(model, ids, cache)` computes them. Made by `decoder_for`."""

    def __init__(
        self, model: CausalLM, cache: KVCache, rows: int, layers: list[tuple[nn.Module, list]]
    ) -> None:
        self.model, self.cache = model, cache
        attn = model.model.layers[0].self_attn
        self.heads, self.kv_heads, self.head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        positions = torch.arange(cache.max_len, device=model.inv_freq.device)
        cos, sin = rope_cos_sin(model.inv_freq, positions, model.compute_dtype)  # (max_len, D)
        half = self.head_dim // 2
        self.cos = cos.contiguous()
        self.sin = torch.cat(
            [-sin[:, :half], sin[:, half:]], dim=-1
        )  # rotate_half's sign folded in
        self.x = torch.zeros(rows, model.config.hidden_size, dtype=model.compute_dtype)  # residual
        fused = model.compute_dtype == torch.float32 and (
            dispatch.requested() == "cpu" or self_check.cpu_decode_trusted()
        )
        self.layers = [
            _FusedLayer(layer, bases, self)
            if fused and _plain(bases) and all(b is m for b, m in zip(bases, _projections(layer)))
            else _Layer(layer, bases, self)
            for layer, bases in layers
        ]

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        model, cache, x = self.model, self.cache, self.x
        if ids.shape != (x.shape[0], 1):
            raise ValueError(f"fast decoder: ids {tuple(ids.shape)}, built for {x.shape[0]} rows")
        p = cache.length
        if p + 1 > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions; {p + 1} requested")
        mask = attention_mask(1, p, model.config.sliding_window, ids.device)
        x.copy_(model.model.embed_tokens(ids[:, 0]))  # (B, C)
        for layer in self.layers:
            layer.run(x, p, mask)
        cache.advance(1)
        return model.lm_head(model.model.norm(x))


def _projections(layer: DecoderLayer) -> list[nn.Module]:
    a, m = layer.self_attn, layer.mlp
    return [a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj]


def decoder_for(model: CausalLM, cache: KVCache, rows: int) -> FastDecoder | None:
    """The fast decoder for steps of `rows` rows, or None where the module path must run (see the
    module doc). Call it with autograd off, inside the DequantCache the steps will run in."""
    if not enabled() or type(model) is not CausalLM or type(cache) is not KVCache:
        return None
    if torch.is_grad_enabled() or model.training or not model.inv_freq.is_cpu:
        return None
    probe = torch.empty(rows, model.config.hidden_size, dtype=model.compute_dtype)
    if not dequant_cache.gemv_covers(probe):
        return None
    if cache.keys[0].shape[0] != rows or cache.keys[0].dtype != model.compute_dtype:
        return None
    layers = []
    for layer in model.model.layers:
        bases = _layer_bases(layer)
        if bases is None or any(b.packed.device != probe.device for b in bases):
            return None
        layers.append((layer, bases))
    if not layers or type(model.model.norm) is not RMSNorm:
        return None
    return FastDecoder(model, cache, rows, layers)


def decode_steps(
    model: CausalLM, cache: KVCache, rows: int, module_path: Callable[[torch.Tensor], torch.Tensor]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The step function: the fast decoder's, or `module_path` where it does not apply."""
    fast = decoder_for(model, cache, rows)
    return module_path if fast is None else fast.step
