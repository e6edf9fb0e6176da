"""CPU benchmarks of the torch backend, each against its peer in the same run (ratios = ours / peer).

  python bench/torch_cpu.py [--out DIR] [--quick] [--json PATH]

1. dequantize a 4096x4096 NF4 weight (double quant): torch reference vs bitsandbytes CPU and torchao NF4;
2. NF4Linear forward+backward (input grad) vs a frozen FP32 nn.Linear at 1, 32 and 512 tokens;
3. one QLoRA training step vs LoRA on the same model with an unquantized FP32 base: time and peak RSS
   (each measured in its own subprocess);
4. BF16 vs FP32 matmul on this CPU (why FP32 is the CPU compute dtype).
Prints markdown; with --out writes results.json and results.md there. --quick: 512x512 weights,
1 and 32 tokens, 3 repeats, no training step (a smoke test).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nf4core
from backends.torch_backend import ops_reference
from backends.torch_backend.nf4_linear import NF4Linear
from backends.torch_backend.nf4_weight import NF4Weight
from bench._timing import median_seconds
from bench.machine import describe
from bench.random_llama import random_llama_state
from bench.results import add_json_option, write_json


def machine() -> str:
    return f"{describe()}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def bench_dequant(repeat: int, size: int = 4096) -> list[dict]:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((size, size)).astype(np.float32)
    ours = NF4Weight.from_nf4(nf4core.quantize(w, 64, double_quant=True))
    t_ours = median_seconds(lambda: ops_reference.dequantize(ours), repeat)
    rows = [dict(impl="ours (torch reference)", seconds=t_ours, ratio=1.0)]
    wt = torch.from_numpy(w)
    try:
        import bitsandbytes.functional as bnb

        q, state = bnb.quantize_4bit(wt, blocksize=64, quant_type="nf4", compress_statistics=True)
        t = median_seconds(lambda: bnb.dequantize_4bit(q, state), repeat)
        rows.append(dict(impl="bitsandbytes CPU", seconds=t, ratio=t_ours / t))
    except Exception as exc:  # noqa: BLE001 - a missing peer is reported, not fatal
        rows.append(dict(impl=f"bitsandbytes unavailable: {exc}", seconds=None, ratio=None))
    try:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

        ao = to_nf4(wt, 64, 256)
        t = median_seconds(lambda: ao.get_original_weight(), repeat)
        rows.append(dict(impl="torchao NF4 (its own format)", seconds=t, ratio=t_ours / t))
    except Exception as exc:  # noqa: BLE001
        rows.append(dict(impl=f"torchao unavailable: {exc}", seconds=None, ratio=None))
    for r in rows:
        if r["seconds"]:
            r["GB_per_s_output"] = size * size * 4 / r["seconds"] / 1e9
    return rows


def bench_linear(repeat: int, tokens_list=(1, 32, 512), size: int = 4096) -> list[dict]:
    torch.manual_seed(0)
    dense = torch.nn.Linear(size, size, bias=False).requires_grad_(False)
    nf4 = NF4Linear.from_linear(dense)
    rows = []
    for tokens in tokens_list:
        x = torch.randn(tokens, size, requires_grad=True)

        def step(layer):
            def run():
                layer(x).sum().backward()
                x.grad = None

            return run

        t_nf4 = median_seconds(step(nf4), repeat)
        t_dense = median_seconds(step(dense), repeat)
        x = x.detach().bfloat16().requires_grad_()
        t_nf4_bf16 = median_seconds(step(nf4), repeat)
        rows.append(
            dict(
                tokens=tokens,
                nf4_seconds=t_nf4,
                fp32_seconds=t_dense,
                ratio=t_nf4 / t_dense,
                nf4_bf16_seconds=t_nf4_bf16,
            )
        )
    return rows


def _train_step_child(kind: str, steps: int) -> dict:
    """Run in a subprocess: build a model, train `steps` steps, report median step time and max RSS."""
    from backends.engine import LoRASettings
    from backends.torch_backend.lora import apply_lora
    from backends.torch_backend.model import CausalLM
    from backends.torch_backend.train_step import Batch, TrainConfig, Trainer

    cfg = nf4core.ModelConfig(
        "llama",
        vocab_size=8192,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=4,
        tie_word_embeddings=True,
    )
    state = random_llama_state(cfg)
    dtype = torch.bfloat16 if kind.endswith("bf16") else torch.float32
    model = CausalLM.from_state(cfg, state, quantize=kind.startswith("qlora"), compute_dtype=dtype)
    del state
    apply_lora(model, LoRASettings(r=16, alpha=32))
    model.gradient_checkpointing = True
    trainer = Trainer(model, TrainConfig())
    ids = torch.randint(0, cfg.vocab_size, (4, 256), generator=torch.Generator().manual_seed(0))
    batch = [Batch(ids)]
    seconds = median_seconds(lambda: trainer.train_step(batch, 1e-4), repeat=steps, warmup=1)
    base_bytes = sum(b.numel() * b.element_size() for n, b in model.named_buffers()) + sum(
        p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" not in n
    )
    return dict(
        kind=kind,
        seconds_per_step=seconds,
        tokens_per_s=ids.numel() / seconds,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        base_weight_mb=base_bytes / 2**20,
    )


def bench_train(steps: int) -> list[dict]:
    rows = []
    for kind in ("qlora", "lora_fp32_base", "qlora_bf16"):
        out = subprocess.run(
            [sys.executable, __file__, "--child", kind, "--steps", str(steps)],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    rows[0]["time_ratio"] = rows[0]["seconds_per_step"] / rows[1]["seconds_per_step"]
    rows[0]["peak_rss_ratio"] = rows[0]["peak_rss_mb"] / rows[1]["peak_rss_mb"]
    return rows


def bench_bf16_vs_fp32(repeat: int) -> dict:
    a, b = torch.randn(1024, 2048), torch.randn(2048, 2048)
    t32 = median_seconds(lambda: a @ b, repeat)
    a16, b16 = a.bfloat16(), b.bfloat16()
    t16 = median_seconds(lambda: a16 @ b16, repeat)
    flops = 2 * 1024 * 2048 * 2048
    return dict(
        shape="(1024x2048)@(2048x2048)",
        fp32_seconds=t32,
        bf16_seconds=t16,
        fp32_gflops=flops / t32 / 1e9,
        bf16_gflops=flops / t16 / 1e9,
        bf16_over_fp32=t16 / t32,
    )


def to_markdown(r: dict) -> str:
    lines = [
        f"Machine: {r['machine']}",
        "",
        f"Dequantize {r['size']}x{r['size']} NF4 (double quant) to FP32 "
        "(median seconds; ratio = ours / peer time, < 1 means ours is faster):",
        "",
        "| implementation | seconds | output GB/s | ours / peer |",
        "|---|---|---|---|",
    ]
    for d in r["dequant"]:
        if d["seconds"] is None:
            lines.append(f"| {d['impl']} | - | - | - |")
        else:
            lines.append(
                f"| {d['impl']} | {d['seconds']:.4f} | {d['GB_per_s_output']:.2f} | {d['ratio']:.2f} |"
            )
    lines += [
        "",
        f"NF4Linear {r['size']}x{r['size']} forward + input-grad backward vs frozen FP32 nn.Linear:",
        "",
        "| tokens | NF4Linear FP32 s | FP32 nn.Linear s | NF4 / FP32 | NF4Linear BF16 compute s |",
        "|---|---|---|---|---|",
    ]
    for d in r["linear"]:
        lines.append(
            f"| {d['tokens']} | {d['nf4_seconds']:.4f} | {d['fp32_seconds']:.4f} | "
            f"{d['ratio']:.2f} | {d['nf4_bf16_seconds']:.4f} |"
        )
    if r.get("train"):
        q, lora_s, qb = r["train"]
        lines += [
            "",
            "Training step (8 layers, hidden 1024, vocab 8192, LoRA r=16 on all 7 projections, "
            "batch 4x256, gradient checkpointing), each in its own process:",
            "",
            "| base | s / step | tokens/s | peak RSS MB | base weights MB |",
            "|---|---|---|---|---|",
        ]
        for d in (q, lora_s, qb):
            lines.append(
                f"| {d['kind']} | {d['seconds_per_step']:.2f} | {d['tokens_per_s']:.0f} | "
                f"{d['peak_rss_mb']:.0f} | {d['base_weight_mb']:.0f} |"
            )
        lines.append(
            f"\nQLoRA / LoRA-FP32: time {q['time_ratio']:.2f}, peak RSS {q['peak_rss_ratio']:.2f}"
        )
    m = r["matmul_dtype"]
    lines += [
        "",
        f"BF16 vs FP32 matmul {m['shape']}: FP32 {m['fp32_gflops']:.1f} GFLOP/s, BF16 "
        f"{m['bf16_gflops']:.1f} GFLOP/s (BF16 takes {m['bf16_over_fp32']:.2f}x the FP32 time)",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT"))
    parser.add_argument("--quick", action="store_true", help="small sizes, no training step")
    add_json_option(parser)
    parser.add_argument("--child")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_train_step_child(args.child, args.steps)))
        return
    repeat, size, tokens = (3, 512, (1, 32)) if args.quick else (7, 4096, (1, 32, 512))
    results = dict(
        machine=machine(),
        size=size,
        dequant=bench_dequant(repeat, size),
        linear=bench_linear(repeat, tokens, size),
        matmul_dtype=bench_bf16_vs_fp32(repeat),
    )
    results["train"] = None if args.quick else bench_train(args.steps)
    md = to_markdown(results)
    print(md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "torch_cpu.json").write_text(json.dumps(results, indent=2))
        (out / "torch_cpu.md").write_text(md + "\n")
    write_json(args.json, results)


if __name__ == "__main__":
    main()
