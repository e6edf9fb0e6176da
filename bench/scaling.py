"""How the cost of a QLoRA training step and of batch-1 decoding grows with model size (torch, CPU,
FP32 compute), and what bounds each: compute or memory.

    python bench/scaling.py [--quick]

Three sizes: a tiny random Llama (2 layers), the default model (SmolLM2-135M-Instruct, NF4, 30
layers), and a random Llama shaped like Llama-3.2-1B (hidden 2048, MLP 8192, 32/8 heads, vocab
128256, tied embeddings) built with 2 layers and modelled at its 16.

Each model's cost is split into parts measured directly, never as a difference of two runs:
- per layer: the built layers' forward + backward and the adapters' clip + AdamW (training as the
  engine runs it: batch 4 x 128 tokens, LoRA r 8 on all seven projections, chunked loss, its
  malloc settings, no gradient checkpointing), or one token through them (decoding, KV cache at
  the middle of a 128-token decode), divided by their number; decoding also times the layers'
  linears alone (the GEMV calls as a layer makes them), to tell the kernel from the rest;
- fixed: everything else, through the model's own code with the layers taken out (training:
  embedding, final norm, LM head and loss forward + backward; decoding: embedding row, norm, LM
  head, argmax).
model(L layers) = fixed + L x per layer, set beside the whole step and the whole decode measured in
the same rounds (the parts and the whole alternate; each figure is a median over the rounds).

Bounds: a training layer's FLOPs (scaling_counts.py) against the peak of the dtype its frozen
matmuls run in (cpu_matmul.py: BF16 inputs on CPUs with native BF16, else FP32; a 2048^3 `mm` as
nf4_linear.base_matmul calls it), the LM head's FLOPs against its own dtype's peak (llama.py
`loss`); a decode layer's NF4 bytes (read by the CPU GEMV, ~4.13 bits per weight) and the fixed
part's FP32 head bytes against the copy bandwidth (a 256 MiB copy, read + write). Near 1: bound by
that peak; far below: the time goes elsewhere (dequantize, small ops, dispatch; see
bench/profile_step.py).
--quick: the tiny model and a small random model modelled at 16 layers, one round (a smoke test).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from torch import nn

import nf4core
from backends.engine import LoRASettings
from backends.torch_backend import cpu_matmul, dequant_cache
from backends.torch_backend.dequant_cache import DequantCache
from backends.torch_backend.generate import SamplingConfig, generate_tokens, last_logits
from backends.torch_backend.lora import apply_lora
from backends.torch_backend.malloc_tuning import keep_freed_memory
from backends.torch_backend.model import CausalLM
from backends.torch_backend.model.masks import attention_mask
from backends.torch_backend.model.rope import rope_cos_sin
from backends.torch_backend.nf4_linear import NF4Linear
from backends.torch_backend.train_step import Batch, TrainConfig, Trainer
from bench import scaling_counts as counts
from bench.machine import describe
from bench.random_llama import random_llama_state

BATCH, SEQ, PROMPT = 4, 128, 16
SIZE = 2048  # of the peak matmul
COPY_BYTES = 256 << 20


@dataclass(frozen=True)
class Size:
    name: str
    build: Callable[[], CausalLM]
    modelled_layers: int | None = None  # also print fixed + this many layers


@dataclass
class Parts:
    """Seconds: per layer and fixed (modelled), whole (measured with the built layers)."""

    layer: float
    fixed: float
    whole: float
    linears: float = 0.0  # decoding: the layer's seven linears alone, per layer

    def model(self, layers: int) -> float:
        return self.fixed + layers * self.layer


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


def default_model() -> CausalLM:
    return CausalLM.from_source(nf4core.open_model(nf4core.default_model_path()))


def timed(fn: Callable[[], object]) -> Callable[[], float]:
    def run() -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    return run


def interleaved_medians(fns: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    """Each fn returns the seconds it measured; after one warmup call each, every round calls each
    fn once in turn (so a slow spell of a shared machine touches all of them), and each gets the
    median over the rounds."""
    for fn in fns.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(fn())
    return {name: statistics.median(s) for name, s in samples.items()}


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "FP32", torch.bfloat16: "BF16"}[dtype]


class Peaks:
    """Timers of what bounds the parts, to run in the same rounds as the parts they bound: a
    2048^3 `mm` per dtype (BF16 in and out with FP32 accumulation, as the frozen matmuls of
    training call it when they take BF16) and a 256 MiB copy."""

    def __init__(self) -> None:
        a, b = torch.randn(SIZE, SIZE), torch.randn(SIZE, SIZE)
        self._mm = {torch.float32: (a, b), torch.bfloat16: (a.bfloat16(), b.bfloat16())}
        self._src = torch.empty(COPY_BYTES // 4)
        self._dst = torch.empty_like(self._src)

    def timers(self, dtypes: set[torch.dtype], copy: bool) -> dict[str, Callable[[], float]]:
        out = {}
        for dtype in dtypes:
            a, b = self._mm[dtype]
            out[f"peak {dtype_name(dtype)}"] = timed(lambda a=a, b=b: a @ b)
        if copy:
            out["peak copy"] = timed(lambda: self._dst.copy_(self._src))
        return out

    @staticmethod
    def rates(seconds: dict[str, float]) -> dict[str, float]:
        """GFLOP/s of each mm and GB/s of the copy (read + write), by name ("FP32", "copy")."""
        out = {}
        for name, t in seconds.items():
            if name.startswith("peak "):
                kind = name.removeprefix("peak ")
                work = 2 * COPY_BYTES if kind == "copy" else 2 * SIZE**3
                out[kind] = work / t / 1e9
        return out


class _LayersOutput(nn.Module):
    """Stands in for the layers: hands on their output (computed once) as a leaf that wants its
    gradient, so the fixed part sees the values the whole step does (the head's time depends on
    them: from the embedding instead, the default model's fixed part took twice as long) and its
    backward stops where the layers' would start."""

    def __init__(self, output: torch.Tensor) -> None:
        super().__init__()
        self.output, self.leaf = output, None

    def forward(self, x, cos, sin, cache, mask):
        self.leaf = self.output.detach().requires_grad_()
        return self.leaf


@contextlib.contextmanager
def layers_replaced(model: CausalLM, layers: list[nn.Module]) -> Iterator[None]:
    kept = model.model.layers
    model.model.layers = nn.ModuleList(layers)
    try:
        yield
    finally:
        model.model.layers = kept


def rope_and_mask(model: CausalLM, length: int, past: int):
    positions = torch.arange(past, past + length)
    cos, sin = rope_cos_sin(model.inv_freq, positions, model.compute_dtype)
    return cos, sin, attention_mask(length, past, model.config.sliding_window, "cpu")


def decode_parts(
    model: CausalLM, new: int, rounds: int, calls: int, peaks: Peaks
) -> tuple[Parts, dict[str, float]]:
    """Seconds per decoded token: per layer, fixed, and the whole of `generate`'s steps after the
    first token (the prompt's prefill is left out); the copy bandwidth in the same rounds."""
    cfg = model.config
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, cfg.vocab_size, (PROMPT,), generator=gen).tolist()
    past = PROMPT + new // 2
    cache = model.new_cache(1, past + 1)
    cos, sin, mask = rope_and_mask(model, 1, past)
    with torch.no_grad():
        x = model.model.embed_tokens(torch.tensor([prompt[-1:]])).to(model.compute_dtype)
    linears = [m for m in model.model.layers.modules() if isinstance(m, NF4Linear)]
    inputs = [torch.randn(1, 1, m.in_features, generator=gen) for m in linears]
    weights = DequantCache.for_decoding(1, model.compute_dtype, torch.device("cpu"))

    def whole() -> float:
        steps = generate_tokens(model, prompt, SamplingConfig(max_new_tokens=new))
        next(steps)
        start = time.perf_counter()
        n = sum(1 for _ in steps)
        if n != new - 1:
            raise SystemExit(f"decode stopped after {n + 1} of {new} tokens")
        return (time.perf_counter() - start) / n

    def layers() -> float:
        model.eval()
        with torch.no_grad(), weights.active():
            start = time.perf_counter()
            for _ in range(calls):
                cache.length = past
                h = x
                for layer in model.model.layers:
                    h = layer(h, cos, sin, cache, mask)
            return (time.perf_counter() - start) / calls

    def linears_alone() -> float:
        with torch.no_grad(), weights.active():
            start = time.perf_counter()
            for _ in range(calls):
                for m, v in zip(linears, inputs):
                    m(v)
            return (time.perf_counter() - start) / calls

    def fixed() -> float:  # generate_tokens' loop with no layers
        model.eval()
        token = prompt[0]
        with torch.no_grad(), layers_replaced(model, []):
            start = time.perf_counter()
            for _ in range(calls):
                cache.length = past
                with weights.active():
                    logits = last_logits(model, torch.tensor([[token]]), cache)[0]
                token = int(torch.argmax(logits))
            return (time.perf_counter() - start) / calls

    fns = {"whole": whole, "layers": layers, "linears": linears_alone, "fixed": fixed}
    t = interleaved_medians({**fns, **peaks.timers(set(), copy=True)}, rounds)
    n = cfg.num_hidden_layers
    parts = Parts(t["layers"] / n, t["fixed"], t["whole"], t["linears"] / n)
    return parts, Peaks.rates(t)


def train_parts(
    model: CausalLM, rounds: int, peaks: Peaks, dtypes: set[torch.dtype]
) -> tuple[Parts, dict[str, float]]:
    """Seconds per training step: per layer (forward + backward, and its adapters' share of clip
    + AdamW), fixed, and the whole `Trainer.train_step`; the mm peaks of `dtypes` in the same
    rounds."""
    cfg = model.config
    apply_lora(model, LoRASettings(r=8, alpha=16.0))
    trainer = Trainer(model, TrainConfig())
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=gen)
    cos, sin, mask = rope_and_mask(model, SEQ, 0)
    grads = [torch.randn(p.shape, generator=gen) * 1e-3 for p in trainer.params]
    model.train()
    with torch.no_grad():  # the activations the whole step sees, at both ends of the layers
        embedded = model.model.embed_tokens(ids).to(model.compute_dtype)
        h = embedded
        for layer in model.model.layers:
            h = layer(h, cos, sin, None, mask)
    entry = _LayersOutput(h)

    def fixed() -> None:
        model.train()
        with layers_replaced(model, [entry]):
            summed, n = model.loss(ids)
            (summed / n).backward()

    fixed()
    grad_out = entry.leaf.grad  # what the layers' backward starts from in the whole step

    def layers() -> None:
        model.train()
        h = embedded
        for layer in model.model.layers:
            h = layer(h, cos, sin, None, mask)
        h.backward(grad_out)
        trainer.optimizer.zero_grad(set_to_none=True)

    def optimizer() -> None:  # train_step's part after the backward
        for p, g in zip(trainer.params, grads):
            p.grad = g
        torch.nn.utils.clip_grad_norm_(trainer.params, trainer.config.max_grad_norm)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    t = interleaved_medians(
        {
            "whole": timed(lambda: trainer.train_step([Batch(ids)], 1e-4)),
            "layers": timed(layers),
            "fixed": timed(fixed),
            "optimizer": timed(optimizer),
            **peaks.timers(dtypes, copy=False),
        },
        rounds,
    )
    per_layer = (t["layers"] + t["optimizer"]) / cfg.num_hidden_layers
    return Parts(per_layer, t["fixed"], t["whole"]), Peaks.rates(t)


def quantization(model: CausalLM) -> tuple[int, bool]:
    """(blocksize, double quant) of the model's NF4 linears."""
    w = next(m for m in model.modules() if isinstance(m, NF4Linear)).weight
    return w.blocksize, w.double_quant


def training_head(model: CausalLM) -> tuple[torch.dtype, int]:
    """The dtype of the training LM head's matmuls and the rows they take, as llama.py `loss` runs
    them: the chunked loss multiplies the counted targets in frozen_matmul_dtype's choice, the
    plain head every position in the compute dtype."""
    if not model.chunked_loss:
        return model.compute_dtype, BATCH * SEQ
    rows = BATCH * (SEQ - 1)
    probe = torch.empty(1, model.config.hidden_size, dtype=model.compute_dtype)
    with torch.enable_grad():
        return cpu_matmul.frozen_matmul_dtype(probe, rows), rows


@dataclass
class Result:
    name: str
    cfg: nf4core.ModelConfig
    built: int  # layers measured
    train: Parts
    decode: Parts
    quant: tuple[int, bool]
    head: tuple[torch.dtype, int]  # training_head
    peaks: dict[str, float]  # Peaks.rates, measured in this model's rounds


def measure(
    size: Size, new: int, rounds: int, calls: int, peaks: Peaks, layer_dtype: torch.dtype
) -> Result:
    model = size.build()
    quant = quantization(model)
    # the base model decodes, before LoRA is applied for training
    decode, copy = decode_parts(model, new, rounds, calls, peaks)
    model.chunked_loss = True  # as the engine trains (backends/torch_backend/engine.py)
    head = training_head(model)
    train, mm = train_parts(model, rounds, peaks, {layer_dtype, head[0], torch.float32})
    built = model.config.num_hidden_layers
    return Result(size.name, model.config, built, train, decode, quant, head, {**copy, **mm})


@dataclass(frozen=True)
class Rates:
    """One model's parts against their bounds: (achieved rate, fraction of the peak) each."""

    train_layer: tuple[float, float]  # GFLOP/s, of the layer matmul dtype's peak
    train_fixed: tuple[float, float]  # GFLOP/s (head FLOPs only), of the head dtype's peak
    decode_layer: tuple[float, float]  # GB/s of the linears' weights, of the copy bandwidth
    decode_linears: tuple[float, float]  # the same bytes over the linears' own time
    decode_fixed: tuple[float, float]


def rates(r: Result, layer_dtype: torch.dtype, weights: str) -> Rates:
    def of(value: float, peak: float) -> tuple[float, float]:
        return value, value / peak

    head_dtype, head_rows = r.head
    layer_bytes = counts.layer_weight_bytes(r.cfg, weights, *r.quant)
    train_layer = counts.train_layer_flops(r.cfg, BATCH, SEQ)
    train_head = counts.train_head_flops(r.cfg, head_rows)
    return Rates(
        of(train_layer / r.train.layer / 1e9, r.peaks[dtype_name(layer_dtype)]),
        of(train_head / r.train.fixed / 1e9, r.peaks[dtype_name(head_dtype)]),
        of(layer_bytes / r.decode.layer / 1e9, r.peaks["copy"]),
        of(layer_bytes / r.decode.linears / 1e9, r.peaks["copy"]),
        of(counts.fixed_decode_bytes(r.cfg) / r.decode.fixed / 1e9, r.peaks["copy"]),
    )


def shown(rate: tuple[float, float]) -> str:
    return f"{rate[0]:.1f} ({rate[1]:.2f})"


def rows_of(results: list[Result], sizes: list[Size]) -> list[tuple[Result, int, bool]]:
    """(result, layers, measured) for each row: the built model, then any modelled depth."""
    out = []
    for r, s in zip(results, sizes):
        out.append((r, r.built, True))
        if s.modelled_layers and s.modelled_layers != r.built:
            out.append((r, s.modelled_layers, False))
    return out


def print_peaks(results: list[Result]) -> None:
    print(
        "Peaks, each measured in the rounds of the model it bounds (GFLOP/s of a 2048^3 mm; BF16: "
        "BF16 in and out, FP32 accumulation; GB/s of a 256 MiB copy, read + write):"
    )
    for r in results:
        print(f"- {r.name}: " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(r.peaks.items())))
    print()


def print_training(results, sizes, layer_dtype, weights) -> None:
    ln, hn = dtype_name(layer_dtype), dtype_name(results[0].head[0])
    print(
        f"Training step: batch {BATCH} x {SEQ}, LoRA r 8 on all seven projections, chunked loss "
        f"(as the engine trains); frozen matmuls of the layers in {ln}, of the LM head in {hn}; "
        "GFLOP/s (fraction of that dtype's 2048^3 mm peak)\n"
    )
    print(
        f"| model | layers | per layer ms | layer GFLOP/s (/ {ln} peak) | fixed ms "
        f"| head GFLOP/s (/ {hn} peak) | step s: fixed + L x layer | measured | tokens/s "
        "| layers' share |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r, layers, measured in rows_of(results, sizes):
        t, rate = r.train, rates(r, layer_dtype, weights)
        step = t.model(layers)
        name = r.name if measured else f"{r.name}, modelled"
        print(
            f"| {name} | {layers} | {t.layer * 1e3:.1f} | {shown(rate.train_layer)} | "
            f"{t.fixed * 1e3:.1f} | {shown(rate.train_fixed)} | {step:.2f} | "
            f"{f'{t.whole:.2f}' if measured else '-'} | {BATCH * SEQ / step:.0f} | "
            f"{layers * t.layer / step:.2f} |"
        )


def print_decoding(results, sizes, layer_dtype, weights, new) -> None:
    what = "NF4 codes through the CPU GEMV" if weights == "nf4" else "FP32 dequant-cache copies"
    print(
        f"\nDecoding: batch 1, greedy, {new} new tokens from a {PROMPT}-token prompt; the layers "
        f"read {what}, the fixed part the FP32 LM head; GB/s (fraction of the copy bandwidth)\n"
    )
    print(
        "| model | layers | per layer ms | layer GB/s (/ copy) | its linears alone ms "
        "| linears GB/s (/ copy) | fixed ms | fixed GB/s (/ copy) | ms/token: fixed + L x layer "
        "| measured | tokens/s | MB/token | layers' share |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r, layers, measured in rows_of(results, sizes):
        d, rate = r.decode, rates(r, layer_dtype, weights)
        layer_bytes = counts.layer_weight_bytes(r.cfg, weights, *r.quant)
        mb = (counts.fixed_decode_bytes(r.cfg) + layers * layer_bytes) / 1e6
        per_token = d.model(layers)
        name = r.name if measured else f"{r.name}, modelled"
        print(
            f"| {name} | {layers} | {d.layer * 1e3:.2f} | {shown(rate.decode_layer)} | "
            f"{d.linears * 1e3:.2f} | {shown(rate.decode_linears)} | "
            f"{d.fixed * 1e3:.2f} | {shown(rate.decode_fixed)} | {per_token * 1e3:.1f} | "
            f"{f'{d.whole * 1e3:.1f}' if measured else '-'} | {1 / per_token:.1f} | {mb:.1f} | "
            f"{layers * d.layer / per_token:.2f} |"
        )


def verdict(rate: tuple[float, float], kind: str) -> str:
    """kind "compute" or "memory": bound (>= 0.6 of the peak), partly (>= 0.3), or not."""
    share = rate[1]
    word = "" if share >= 0.6 else "partly " if share >= 0.3 else "not "
    return f"{share:.2f}, {word}{kind}-bound"


def print_bounds(results, layer_dtype, weights) -> None:
    ln, hn = dtype_name(layer_dtype), dtype_name(results[0].head[0])
    print(
        f"\nWhat bounds what (fraction of the peak; training: of the {ln} mm peak for the layers, "
        f"{hn} for the head; decoding: of the copy bandwidth):"
    )
    for r in results:
        rate = rates(r, layer_dtype, weights)
        print(
            f"- {r.name}: training layers {verdict(rate.train_layer, 'compute')}, head "
            f"{verdict(rate.train_fixed, 'compute')}; decoding layers "
            f"{verdict(rate.decode_layer, 'memory')} (their linears alone "
            f"{verdict(rate.decode_linears, 'memory')}), head "
            f"{verdict(rate.decode_fixed, 'memory')}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    new, rounds, calls = (8, 1, 2) if args.quick else (128, 3, 10)
    torch.manual_seed(0)
    keep_freed_memory()  # as the engine does for CPU training
    print(f"machine: {describe()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(cpu_matmul.describe())
    probe = torch.empty(BATCH * SEQ, 64)
    with torch.enable_grad():
        layer_dtype = cpu_matmul.frozen_matmul_dtype(probe, BATCH * SEQ)
    weights = "nf4" if dequant_cache.gemv_covers(torch.empty(1, 64)) else "fp32"
    peaks = Peaks()
    sizes = [Size("tiny", lambda: random_model(llama(64, 128, 4, 2, 2, 256)))]
    if args.quick:
        sizes.append(Size("small", lambda: random_model(llama(128, 256, 4, 2, 2, 512)), 16))
    else:
        sizes.append(Size("default 135M", default_model))
        big = llama(2048, 8192, 32, 8, 2, 128256)
        sizes.append(Size("1B-shaped", lambda: random_model(big), 16))
    results = [measure(s, new, rounds, calls, peaks, layer_dtype) for s in sizes]
    print_peaks(results)
    print_training(results, sizes, layer_dtype, weights)
    print_decoding(results, sizes, layer_dtype, weights, new)
    print_bounds(results, layer_dtype, weights)


if __name__ == "__main__":
    main()
