"""Decoding at batch 1 on the CPU: our `generate` vs transformers' FP32 `generate`, and NF4Linear at
one token vs a dense FP32 `F.linear`.

    python bench/decode_vs_transformers.py [--new-tokens 128] [--quick] [--json PATH]

1. The default model (SmolLM2-135M-Instruct GGUF), the same prompt ids, greedy, exactly
   --new-tokens new tokens (no stop token) on both sides, FP32 compute: ours (NF4 weights, torch
   backend, with the dequant cache as `generate` uses it, and with it off:
   NF4_QLORA_DEQUANT_CACHE_MB=0) vs transformers' `generate` on the model loaded from the GGUF in
   float32. Each timed after a short warmup generate, the faster of two calls; tokens/s = new
   tokens / wall time of the call (prefill included).
2. NF4Linear (double quant, blocksize 64) on one token, no grad, for 576x1536, 1536x576 and
   4096x4096 (out x in): the per-call path (dequantize, then multiply), the cached path (inside an
   active DequantCache, as in generation) and FP32 `F.linear` on the dense weight.
--quick: 8 new tokens, a 2-layer cut of the model for part 1, no 4096x4096 in part 2 (smoke test).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import nf4core  # noqa: E402
from backends.torch_backend.dequant_cache import DequantCache  # noqa: E402
from backends.torch_backend.generate import SamplingConfig, generate  # noqa: E402
from backends.torch_backend.model import CausalLM  # noqa: E402
from backends.torch_backend.nf4_linear import NF4Linear  # noqa: E402
from bench._timing import median_seconds  # noqa: E402
from bench.machine import describe  # noqa: E402
from bench.results import add_json_option, write_json  # noqa: E402

PROMPT = "Write a short story about a robot who learns to paint."
SHAPES = ((576, 1536), (1536, 576), (4096, 4096))


def prompt_ids(source: nf4core.ModelSource) -> list[int]:
    tok = source.tokenizer()
    return tok.encode(PROMPT)


def time_call(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def ours(source: nf4core.ModelSource, ids: list[int], new: int, layers: int) -> dict:
    """Each variant: the faster of two timed calls (other jobs share the machine)."""
    model = CausalLM.from_source(source, compute_dtype=torch.float32)
    if layers:
        del model.model.layers[layers:]
    cfg = SamplingConfig(max_new_tokens=new)
    rows = {}
    variants = (("ours, dequant cache (generate's default)", None), ("ours, cache off", "0"))
    for name, budget in variants:
        if budget is not None:
            os.environ["NF4_QLORA_DEQUANT_CACHE_MB"] = budget
        generate(model, ids, SamplingConfig(max_new_tokens=4))  # warmup
        seconds, tokens = min(time_call(lambda: generate(model, ids, cfg)) for _ in range(2))
        os.environ.pop("NF4_QLORA_DEQUANT_CACHE_MB", None)
        rows[name] = dict(seconds=seconds, tokens=tokens)
    return rows


def peer(source: nf4core.ModelSource, ids: list[int], new: int, layers: int) -> dict:
    import transformers

    path = source.path
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    if layers:
        del model.model.layers[layers:]
        model.config.num_hidden_layers = layers
    model.eval()
    x = torch.tensor([ids])
    kw = dict(do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.generate(x, max_new_tokens=4, min_new_tokens=4, **kw)
        seconds, out = min(
            (
                time_call(lambda: model.generate(x, max_new_tokens=new, min_new_tokens=new, **kw))
                for _ in range(2)
            ),
            key=lambda r: r[0],
        )
    return {"transformers FP32 generate": dict(seconds=seconds, tokens=out[0, len(ids) :].tolist())}


def one_token_linear(repeat: int, shapes=SHAPES) -> list[dict]:
    rows = []
    torch.manual_seed(0)
    for out_f, in_f in shapes:
        dense = torch.nn.Linear(in_f, out_f, bias=False).requires_grad_(False)
        layer = NF4Linear.from_linear(dense)
        w = layer.dequantize()
        x = torch.randn(1, in_f)
        with torch.no_grad():
            per_call = median_seconds(lambda: layer(x), repeat)
            with DequantCache(budget_bytes=1 << 40).active():  # as in generation: once per forward
                hit = median_seconds(lambda: layer(x), repeat)
            fp32 = median_seconds(lambda: F.linear(x, w), repeat)
        rows.append(
            dict(
                shape=f"{out_f}x{in_f}",
                per_call_ms=per_call * 1e3,
                cached_ms=hit * 1e3,
                fp32_ms=fp32 * 1e3,
            )
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--quick", action="store_true")
    add_json_option(ap)
    args = ap.parse_args()
    new, layers, repeat = (8, 2, 5) if args.quick else (args.new_tokens, 0, 50)
    print(f"machine: {describe()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    source = nf4core.open_model(nf4core.default_model_path())
    ids = prompt_ids(source)
    print(
        f"model: {source.path.name}{f' (first {layers} layers)' if layers else ''}; prompt "
        f"{len(ids)} tokens; greedy, {new} new tokens; FP32 compute\n"
    )
    rows = {**ours(source, ids, new, layers), **peer(source, ids, new, layers)}
    ref = rows["transformers FP32 generate"]
    print("| decoder | seconds | tokens/s | / transformers | first 16 tokens match transformers |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        rate = new / r["seconds"]
        same = r["tokens"][:16] == ref["tokens"][:16]
        print(
            f"| {name} | {r['seconds']:.2f} | {rate:.1f} | "
            f"{ref['seconds'] / r['seconds']:.2f} | {'yes' if same else 'no'} |"
        )
    print(
        "\nNF4Linear at one token (no grad, double quant, blocksize 64) vs FP32 F.linear, "
        "median ms:\n"
    )
    print(
        "| out x in | per call (dequantize + matmul) | cached | FP32 F.linear | per call / FP32 "
        "| cached / FP32 |\n|---|---|---|---|---|---|"
    )
    linears = one_token_linear(repeat, SHAPES[:2] if args.quick else SHAPES)
    for r in linears:
        print(
            f"| {r['shape']} | {r['per_call_ms']:.3f} | {r['cached_ms']:.3f} | "
            f"{r['fp32_ms']:.3f} | "
            f"{r['per_call_ms'] / r['fp32_ms']:.1f} | {r['cached_ms'] / r['fp32_ms']:.2f} |"
        )
    decoders = {
        name: dict(seconds=r["seconds"], tokens_per_s=new / r["seconds"])
        for name, r in rows.items()
    }
    write_json(args.json, dict(new_tokens=new, layers=layers, decode=decoders, linear=linears))


if __name__ == "__main__":
    main()
