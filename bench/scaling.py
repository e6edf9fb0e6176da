"""How the cost of a QLoRA training step and of batch-1 decoding grows with model size (torch, CPU,
FP32 compute), and whether each is bound by compute or by memory.

    python bench/scaling.py [--quick]

Three sizes: a tiny random Llama, the default model (SmolLM2-135M-Instruct, NF4), and a random
Llama shaped like Llama-3.2-1B (hidden 2048, MLP 8192, 32/8 heads, vocab 128256, tied embeddings)
built with 1 and with 2 layers: the difference is the cost of one layer, and the 16-layer figure is
extrapolated as cost(1) + 15 * (cost(2) - cost(1)).
- Training: one step of batch 4 x 128 tokens, LoRA r 8 on all seven projections, no gradient
  checkpointing, median of 3 after a warmup step. Achieved GFLOP/s counts 4 FLOPs per frozen base
  weight per token (forward, and the backward to the activations: a frozen weight has no weight
  gradient) plus attention; it is compared with this machine's FP32 matmul peak (a 2048^3 `mm`).
- Decoding: `generate`, greedy, 128 new tokens (32 with --quick) from a 16-token prompt, the faster of
  two calls. Achieved GB/s counts the dense FP32 weights that each token reads (the dequant cache
  holds them in FP32 during generation); it is compared with this machine's copy bandwidth (a
  256 MiB tensor copy: read + write).
Each is printed as a fraction of the peak that would bound it: near 1, the phase is bound by it;
far below, the time goes elsewhere (dequantize, small ops, Python; see bench/profile_step.py).
--quick: the tiny model and a 1-layer cut of the default model only (a smoke test).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

import nf4core
from backends.engine import LoRASettings
from backends.torch_backend.generate import SamplingConfig, generate
from backends.torch_backend.lora import apply_lora
from backends.torch_backend.model import CausalLM
from backends.torch_backend.train_step import Batch, TrainConfig, Trainer
from bench._timing import median_seconds
from bench.machine import describe
from bench.random_llama import random_llama_state

BATCH, SEQ, PROMPT = 4, 128, 16


def llama(hidden, mlp, heads, kv_heads, layers, vocab) -> nf4core.ModelConfig:
    return nf4core.ModelConfig(
        "llama",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        tie_word_embeddings=True,
    )


def random_model(cfg: nf4core.ModelConfig) -> CausalLM:
    return CausalLM.from_state(cfg, random_llama_state(cfg), compute_dtype=torch.float32)


def default_model(layers: int | None) -> CausalLM:
    model = CausalLM.from_source(nf4core.open_model(nf4core.default_model_path()))
    if layers is not None:
        del model.model.layers[layers:]
    return model


def base_params(cfg: nf4core.ModelConfig) -> tuple[int, int]:
    """(weights of one layer's seven projections, weights of the LM head)."""
    c, f = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * cfg.resolved_head_dim
    return 2 * c * c + 2 * kv * c + 3 * c * f, cfg.vocab_size * c


def train_flops(cfg: nf4core.ModelConfig, layers: int) -> float:
    per_layer, head = base_params(cfg)
    tokens = BATCH * SEQ
    attention = 2 * 2 * SEQ * cfg.hidden_size * tokens  # QK^T and PV, forward + backward halves
    return 4 * tokens * (layers * per_layer + head) + 2 * layers * attention


def decode_bytes_per_token(cfg: nf4core.ModelConfig, layers: int) -> float:
    per_layer, head = base_params(cfg)
    return 4 * (layers * per_layer + head)


def train_seconds(model: CausalLM, vocab: int, repeat: int) -> float:
    apply_lora(model, LoRASettings(r=8, alpha=16.0))
    trainer = Trainer(model, TrainConfig())
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    return median_seconds(lambda: trainer.train_step([Batch(ids)], 1e-4), repeat)


def decode_seconds(model: CausalLM, vocab: int, new: int) -> float:
    ids = torch.randint(0, vocab, (PROMPT,), generator=torch.Generator().manual_seed(1)).tolist()
    cfg = SamplingConfig(max_new_tokens=new)
    generate(model, ids, SamplingConfig(max_new_tokens=4))
    times = []
    for _ in range(2):
        start = time.perf_counter()
        out = generate(model, ids, cfg)
        times.append(time.perf_counter() - start)
    if len(out) != new:
        raise SystemExit(f"decode stopped after {len(out)} of {new} tokens")
    return min(times)


def machine_peaks() -> tuple[float, float]:
    """(FP32 matmul GFLOP/s, copy GB/s counting read + write)."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    mm = median_seconds(lambda: a @ b, 5)
    src = torch.empty(64 << 20)
    dst = torch.empty_like(src)
    copy = median_seconds(lambda: dst.copy_(src), 5)
    return 2 * 2048**3 / mm / 1e9, 2 * src.numel() * 4 / copy / 1e9


def measure(name, build, cfg, layers, new, repeat) -> dict:
    model = build()
    step = train_seconds(model, cfg.vocab_size, repeat)
    del model
    model = build()
    decode = decode_seconds(model, cfg.vocab_size, new)
    return dict(name=name, cfg=cfg, layers=layers, step=step, decode=decode / new)


def extrapolate(one: dict, two: dict, layers: int) -> dict:
    return dict(
        name=f"{one['name'].split(',')[0]}, {layers} layers (extrapolated)",
        cfg=one["cfg"],
        layers=layers,
        step=one["step"] + (layers - 1) * (two["step"] - one["step"]),
        decode=one["decode"] + (layers - 1) * (two["decode"] - one["decode"]),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    new, repeat = (32, 1) if args.quick else (128, 3)
    print(f"machine: {describe()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    peaks = machine_peaks()
    print(f"peaks: FP32 matmul {peaks[0]:.0f} GFLOP/s, copy {peaks[1]:.1f} GB/s\n")
    torch.manual_seed(0)
    tiny = llama(64, 128, 4, 2, 2, 256)
    default_cfg = nf4core.open_model(nf4core.default_model_path()).config
    rows = [measure("tiny", lambda: random_model(tiny), tiny, 2, new, repeat)]
    if args.quick:
        rows.append(
            measure("default, 1 layer", lambda: default_model(1), default_cfg, 1, new, repeat)
        )
    else:
        layers = default_cfg.num_hidden_layers
        rows.append(
            measure("default 135M", lambda: default_model(None), default_cfg, layers, new, repeat)
        )
        big = [llama(2048, 8192, 32, 8, n, 128256) for n in (1, 2)]
        one, two = (
            measure(
                f"1B-shaped, {n} layer{'s' * (n > 1)}",
                lambda c=c: random_model(c),
                c,
                n,
                new,
                repeat,
            )
            for n, c in zip((1, 2), big)
        )
        rows += [one, two, extrapolate(one, two, 16)]
    print(
        f"Training step (batch {BATCH} x {SEQ}, LoRA r 8, FP32) and decoding (batch 1, greedy):\n"
    )
    print(
        "| model | layers | step s | train tokens/s | train GFLOP/s | / matmul peak "
        "| decode ms/token | decode tokens/s | weight GB/s | / copy bandwidth |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        gflops = train_flops(r["cfg"], r["layers"]) / r["step"] / 1e9
        gbs = decode_bytes_per_token(r["cfg"], r["layers"]) / r["decode"] / 1e9
        print(
            f"| {r['name']} | {r['layers']} | {r['step']:.2f} | {BATCH * SEQ / r['step']:.0f} | "
            f"{gflops:.1f} | {gflops / peaks[0]:.2f} | {r['decode'] * 1e3:.1f} | "
            f"{1 / r['decode']:.1f} | {gbs:.2f} | {gbs / peaks[1]:.2f} |"
        )


if __name__ == "__main__":
    main()
