"""Decoding at batch 1 on the CPU: our `generate` vs transformers' FP32 `generate`, and NF4Linear at
one token vs a dense FP32 `F.linear`.

    python bench/decode_vs_transformers.py [--new-tokens 128] [--quick] [--json PATH]

1. The default model (SmolLM2-135M-Instruct GGUF), the same prompt ids, greedy, exactly
   --new-tokens new tokens (no stop token) on both sides, FP32 compute: ours (NF4 weights, torch
   backend) as `generate` runs now (the 4-bit CPU GEMV kernel under the fast decode path,
   fast_decode.py), the same kernel through the modules (NF4_QLORA_FAST_DECODE=0) and as it ran
   before the kernel (the dequant cache of FP32 weights), vs transformers' `generate` on the model
   loaded from the GGUF in float32. Each timed after a short warmup generate, the faster of two
   calls; tokens/s = new tokens / wall time of the call (prefill included).
2. Where a decode step's time goes, each way: the NF4 linears (210 calls through the modules; 120
   kernel calls on the fast path, which also do the RMSNorms, RoPE and the KV cache writes), the LM
   head (the tied FP32 embedding, 576x49152), the rest (attention, SiLU, Python); and the bytes of
   dense weights the dequant cache holds while decoding.
3. NF4Linear (double quant, blocksize 64) on one token, no grad, for 576x1536, 1536x576 and
   4096x4096 (out x in): the GEMV kernel, the per-call path (dequantize, then multiply), the cached
   path (inside an active DequantCache) and FP32 `F.linear` on the dense weight; then the same at
   2..32 rows, which sets the kernel's row limits (cpu_gemv.MAX_ROWS, MAX_ROWS_PER_CALL).
--quick: 8 new tokens, a 2-layer cut of the model for parts 1-2, no 4096x4096 and fewer row counts
in part 3 (smoke test).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Iterator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import nf4core  # noqa: E402
from backends.torch_backend import (
    cpu_gemv,  # noqa: E402
    dequant_cache,  # noqa: E402
)
from backends.torch_backend.cpu_gemv import DecodeProjection, GemvGroup  # noqa: E402
from backends.torch_backend.dequant_cache import DequantCache  # noqa: E402
from backends.torch_backend.dispatch import force_path  # noqa: E402
from backends.torch_backend.fast_decode import decode_steps  # noqa: E402
from backends.torch_backend.generate import SamplingConfig, generate, last_logits  # noqa: E402
from backends.torch_backend.model import CausalLM  # noqa: E402
from backends.torch_backend.nf4_linear import NF4Linear  # noqa: E402
from bench._timing import median_seconds  # noqa: E402
from bench.machine import describe  # noqa: E402
from bench.results import add_json_option, write_json  # noqa: E402

PROMPT = "Write a short story about a robot who learns to paint."
SHAPES = ((576, 1536), (1536, 576), (4096, 4096))
KERNEL = "ours, 4-bit GEMV kernel, fast decode path (generate's default)"
MODULES = "ours, 4-bit GEMV kernel through the modules (fast decode off)"
OLD = "ours, kernel off: dequant cache (the previous default)"


@contextlib.contextmanager
def fast_decode_off() -> Iterator[None]:
    """The GEMV kernel through the module tree: what `generate` ran before fast_decode.py."""
    before = os.environ.get("NF4_QLORA_FAST_DECODE")
    os.environ["NF4_QLORA_FAST_DECODE"] = "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ["NF4_QLORA_FAST_DECODE"]
        else:
            os.environ["NF4_QLORA_FAST_DECODE"] = before


VARIANTS = ((KERNEL, contextlib.nullcontext), (MODULES, fast_decode_off))


@contextlib.contextmanager
def kernel_off() -> Iterator[None]:
    """Auto mode without the GEMV kernel: what `generate` ran before it (host dequantize + cache)."""
    covers = dequant_cache.gemv_covers
    dequant_cache.gemv_covers = lambda x: False
    try:
        yield
    finally:
        dequant_cache.gemv_covers = covers


def prompt_ids(source: nf4core.ModelSource) -> list[int]:
    tok = source.tokenizer()
    return tok.encode(PROMPT)


def time_call(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def ours(model: CausalLM, ids: list[int], new: int) -> dict:
    """Each variant: the faster of two timed calls (other jobs share the machine)."""
    cfg = SamplingConfig(max_new_tokens=new)
    rows = {}
    for name, ctx in (*VARIANTS, (OLD, kernel_off)):
        with ctx():
            generate(model, ids, SamplingConfig(max_new_tokens=4))  # warmup
            seconds, tokens = min(time_call(lambda: generate(model, ids, cfg)) for _ in range(2))
        rows[name] = dict(seconds=seconds, tokens=tokens)
    return rows


class _Split:
    """Wall time spent inside the NF4 linears and inside the LM head while installed."""

    def __init__(self, model: CausalLM) -> None:
        self.model, self.linear_s, self.head_s = model, 0.0, 0.0

    def _timed(self, fn, attr: str):
        def call(*args):
            start = time.perf_counter()
            out = fn(*args)
            setattr(self, attr, getattr(self, attr) + time.perf_counter() - start)
            return out

        return call

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        timed = ((NF4Linear, "forward"), (GemvGroup, "__call__"), (DecodeProjection, "__call__"))
        originals = [getattr(cls, attr) for cls, attr in timed]
        for (cls, attr), fn in zip(timed, originals, strict=True):
            setattr(cls, attr, self._timed(fn, "linear_s"))
        self.model.lm_head.forward = self._timed(self.model.lm_head.forward, "head_s")
        try:
            yield
        finally:
            for (cls, attr), fn in zip(timed, originals, strict=True):
                setattr(cls, attr, fn)
            del self.model.lm_head.forward


def decode_profile(model: CausalLM, ids: list[int], steps: int) -> dict:
    """Per decode step (batch 1, after the prefill): total, NF4 linears, LM head, the rest; and
    the dense bytes the dequant cache holds. Timers add ~1 us per call."""
    model.eval()  # as generate runs it (the fast decode path takes eval-mode models only)
    out = {}
    for name, ctx in (*VARIANTS, (OLD, kernel_off)):
        with ctx(), torch.no_grad():
            cache = model.new_cache(1, len(ids) + 2 * steps + 1)
            weights = DequantCache.for_decoding(1, torch.float32, torch.device("cpu"))
            with weights.active():
                token = int(last_logits(model, torch.tensor([ids]), cache).argmax())
                logits = decode_steps(model, cache, 1, lambda t: last_logits(model, t, cache))

            def step():
                nonlocal token
                with weights.active():
                    token = int(logits(torch.tensor([[token]])).argmax())

            for _ in range(steps // 2):
                step()  # warm: the cache (if any) is full
            split = _Split(model)
            start = time.perf_counter()
            with split.installed():
                for _ in range(steps):
                    step()
            total = (time.perf_counter() - start) / steps
        linear, head = split.linear_s / steps, split.head_s / steps
        out[name] = dict(
            step_ms=total * 1e3,
            linears_ms=linear * 1e3,
            lm_head_ms=head * 1e3,
            rest_ms=(total - linear - head) * 1e3,
            dense_cache_mib=weights.used / 2**20,
        )
    return out


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


def one_token_linear(repeat: int, shapes=SHAPES, rows=(1,)) -> list[dict]:
    out = []
    torch.manual_seed(0)
    for out_f, in_f in shapes:
        dense = torch.nn.Linear(in_f, out_f, bias=False).requires_grad_(False)
        layer = NF4Linear.from_linear(dense)
        w = layer.dequantize()
        for m in rows:
            x = torch.randn(m, in_f)
            with torch.no_grad():
                with force_path("cpu"):  # the kernel at every row count
                    kernel = median_seconds(lambda: layer(x), repeat)
                with kernel_off():
                    per_call = median_seconds(lambda: layer(x), max(repeat // 5, 3))
                    with DequantCache(budget_bytes=1 << 40).active():  # as generation used it
                        hit = median_seconds(lambda: layer(x), repeat)
                fp32 = median_seconds(lambda: F.linear(x, w), repeat)
            out.append(
                dict(
                    shape=f"{out_f}x{in_f}",
                    rows=m,
                    kernel_ms=kernel * 1e3,
                    per_call_ms=per_call * 1e3,
                    cached_ms=hit * 1e3,
                    fp32_ms=fp32 * 1e3,
                )
            )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--quick", action="store_true")
    add_json_option(ap)
    args = ap.parse_args()
    new, layers, repeat = (8, 2, 5) if args.quick else (args.new_tokens, 0, 50)
    isa = cpu_gemv.isa()  # builds the kernel (cached on disk) before anything is timed
    print(
        f"machine: {describe()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"GEMV kernel: {isa}"
    )
    source = nf4core.open_model(nf4core.default_model_path())
    ids = prompt_ids(source)
    print(
        f"model: {source.path.name}{f' (first {layers} layers)' if layers else ''}; prompt "
        f"{len(ids)} tokens; greedy, {new} new tokens; FP32 compute\n"
    )
    model = CausalLM.from_source(source, compute_dtype=torch.float32)
    if layers:
        del model.model.layers[layers:]
    rows = {**ours(model, ids, new), **peer(source, ids, new, layers)}
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
    kernel_vs_old = rows[OLD]["seconds"] / rows[KERNEL]["seconds"]
    fast_vs_modules = rows[MODULES]["seconds"] / rows[KERNEL]["seconds"]
    print(f"\nfast decode path / previous default: {kernel_vs_old:.2f}x the tokens/s")
    print(f"fast decode path / the kernel through the modules: {fast_vs_modules:.2f}x the tokens/s")
    same = rows[KERNEL]["tokens"] == rows[MODULES]["tokens"] == rows[OLD]["tokens"]
    print(f"same tokens, all three of ours: {'yes' if same else 'no'}")
    profile = decode_profile(model, ids, 8 if args.quick else 40)
    print("\nOne decode step (batch 1, after the prefill), ms:\n")
    print("| decoder | step | NF4 linears | LM head | rest | dense cache held (MiB) |")
    print("|---|---|---|---|---|---|")
    for name, p in profile.items():
        print(
            f"| {name} | {p['step_ms']:.1f} | {p['linears_ms']:.1f} | {p['lm_head_ms']:.1f} | "
            f"{p['rest_ms']:.1f} | {p['dense_cache_mib']:.0f} |"
        )
    print(
        "\nNF4Linear at one token (no grad, double quant, blocksize 64) vs FP32 F.linear, "
        "median ms:\n"
    )
    print(
        "| out x in | GEMV kernel | per call (dequantize + matmul) | cached | FP32 F.linear "
        "| kernel / FP32 | cached / FP32 |\n|---|---|---|---|---|---|---|"
    )
    linears = one_token_linear(repeat, SHAPES[:2] if args.quick else SHAPES)
    for r in linears:
        print(
            f"| {r['shape']} | {r['kernel_ms']:.3f} | {r['per_call_ms']:.3f} | "
            f"{r['cached_ms']:.3f} | {r['fp32_ms']:.3f} | "
            f"{r['kernel_ms'] / r['fp32_ms']:.2f} | {r['cached_ms'] / r['fp32_ms']:.2f} |"
        )
    sweep_rows = (2, 8) if args.quick else (2, 4, 8, 12, 16, 24, 32)
    sweep_shapes = SHAPES[:1] if args.quick else (SHAPES[0], SHAPES[2])
    sweep = one_token_linear(max(repeat // 5, 3), sweep_shapes, sweep_rows)
    print("\nThe same at more rows (auto-mode row limits), median ms:\n")
    print("| out x in | rows | GEMV kernel | per call | cached | FP32 F.linear |")
    print("|---|---|---|---|---|---|")
    for r in sweep:
        print(
            f"| {r['shape']} | {r['rows']} | {r['kernel_ms']:.3f} | {r['per_call_ms']:.3f} | "
            f"{r['cached_ms']:.3f} | {r['fp32_ms']:.3f} |"
        )
    decoders = {
        name: dict(seconds=r["seconds"], tokens_per_s=new / r["seconds"])
        for name, r in rows.items()
    }
    write_json(
        args.json,
        dict(
            new_tokens=new,
            layers=layers,
            isa=isa,
            decode=decoders,
            profile=profile,
            linear=linears,
            rows_sweep=sweep,
        ),
    )


if __name__ == "__main__":
    main()
