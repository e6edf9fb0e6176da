"""Where one QLoRA training step of ours spends its time and memory (torch backend, CPU, FP32).

    python bench/profile_step.py [--model DIR_OR_GGUF] [--batch 4] [--seq 128] [--grad-checkpoint]
                                 [--quick] [--json PATH]

The default model, LoRA r 8 on all seven projections, random tokens, as `cli.py finetune` trains it.
Time: one step under torch.profiler after two warmup steps; every op's self time goes to one bucket:
NF4 dequantize (everything under our dequantize call), matmuls (mm/addmm/bmm), attention (SDPA and
its backward), LM head (the matmuls against the vocab-sized weight), loss (log-softmax, NLL and
their backward), optimizer (clipping and the AdamW step), other ops (norms, RoPE, activations, adds,
copies), and Python overhead = wall time minus all of the above. Memory: the peak resident memory of
each phase of another step (VmHWM, reset between phases through /proc/self/clear_refs).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import nf4core  # noqa: E402
from backends.engine import LoRASettings  # noqa: E402
from backends.torch_backend import ops_host, ops_reference  # noqa: E402
from backends.torch_backend.lora import apply_lora  # noqa: E402
from backends.torch_backend.model import CausalLM  # noqa: E402
from backends.torch_backend.model.llama import causal_lm_loss  # noqa: E402
from backends.torch_backend.train_step import Batch, TrainConfig, Trainer  # noqa: E402
from bench.machine import describe  # noqa: E402
from bench.results import add_json_option, write_json  # noqa: E402

DEQUANT = "nf4.dequantize"
MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"}
LOSS = ("log_softmax", "nll_loss", "cross_entropy")


def label_dequantize() -> None:
    """Wrap our dequantize implementations in a profiler label (numpy work has no op events)."""
    for module in (ops_host, ops_reference):
        original = module.dequantize

        def wrapped(w, dtype=torch.float32, _original=original):
            with torch.profiler.record_function(DEQUANT):
                return _original(w, dtype)

        module.dequantize = wrapped


def bucket(event, vocab: int) -> str:
    parent = event
    while parent is not None:
        if parent.name == DEQUANT:
            return "NF4 dequantize"
        if parent.name.startswith("Optimizer.") or "clip_grad" in parent.name:
            return "optimizer + clipping"
        parent = parent.cpu_parent
    name = event.name
    if name in MATMULS:
        shapes = [s for s in (event.input_shapes or []) if s]
        return "LM head matmuls" if any(vocab in s for s in shapes) else "matmuls (block linears)"
    if "scaled_dot_product" in name or "flash_attention" in name or "_efficient_attention" in name:
        return "attention (SDPA)"
    if any(k in name for k in LOSS):
        return "loss (log-softmax, NLL)"
    return "other ops"


class PhasePeaks:
    """Peak RSS of each phase: VmHWM read at the end of the phase, reset at its start."""

    def __init__(self) -> None:
        self.peaks: dict[str, int] = {}

    @staticmethod
    def _status() -> dict[str, int]:
        with open("/proc/self/status") as f:
            d = dict(line.split(":", 1) for line in f)
        return {k: int(d[k].split()[0]) // 1024 for k in ("VmRSS", "VmHWM")}

    def start(self) -> int:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return self._status()["VmRSS"]

    def end(self, name: str, before: int) -> None:
        s = self._status()
        self.peaks[name] = (before, s["VmHWM"], s["VmRSS"])


def saved_for_backward(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, float]:
    """MiB of distinct tensors (weights excepted) autograd saves for backward in one forward +
    loss, by the innermost module that saved them (the loss outside the model is "loss")."""
    stack = ["loss"]
    hooks = []
    for name, m in model.named_modules():
        kind = type(m).__name__ + (" (lm_head)" if name == "lm_head" else "")
        hooks.append(m.register_forward_pre_hook(lambda mod, a, k=kind: stack.append(k) and None))
        hooks.append(m.register_forward_hook(lambda mod, a, o: stack.pop() and None))
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, tuple[str, int]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:  # a weight is no memory of the step's
            seen.setdefault(storage.data_ptr(), (stack[-1], storage.nbytes()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        summed, n = causal_lm_loss(model(ids), ids)
    for h in hooks:
        h.remove()
    del summed
    out: dict[str, float] = collections.defaultdict(float)
    for kind, nbytes in seen.values():
        out[kind] += nbytes / 2**20
    return dict(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--grad-checkpoint", action="store_true")
    ap.add_argument(
        "--quick", action="store_true", help="2 layers, batch 1 x 16 tokens (a smoke test)"
    )
    add_json_option(ap)
    args = ap.parse_args()
    if args.quick:
        args.batch, args.seq = 1, 16
    source = nf4core.open_model(args.model or nf4core.default_model_path())
    model = CausalLM.from_source(source, compute_dtype=torch.float32)
    if args.quick:
        del model.model.layers[2:]
    apply_lora(model, LoRASettings(r=8, alpha=16))
    model.gradient_checkpointing = args.grad_checkpoint
    model.chunked_loss = True
    trainer = Trainer(model, TrainConfig())
    vocab = source.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=gen)
    batch = Batch(ids)
    for _ in range(2):
        trainer.train_step([batch], 2e-4)
    peaks = PhasePeaks()
    model.train()
    before = peaks.start()
    logits = model(ids)
    peaks.end("forward to logits", before)
    before = peaks.start()
    summed, n = causal_lm_loss(logits, ids)
    loss = summed / n
    peaks.end("loss (cross-entropy)", before)
    before = peaks.start()
    loss.backward()
    peaks.end("backward", before)
    del logits, summed, loss
    before = peaks.start()
    torch.nn.utils.clip_grad_norm_(trainer.params, 1.0)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    peaks.end("optimizer", before)
    label_dequantize()

    start = time.perf_counter()
    trainer.train_step([batch], 2e-4)
    plain = time.perf_counter() - start
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True
    ) as prof:
        start = time.perf_counter()
        trainer.train_step([batch], 2e-4)
        wall = time.perf_counter() - start
    buckets: dict[str, float] = collections.defaultdict(float)
    others: dict[str, float] = collections.defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CPU:
            b = bucket(e, vocab)
            buckets[b] += e.self_cpu_time_total / 1e6
            if b == "other ops":
                others[e.name] += e.self_cpu_time_total / 1e6
    profiled = sum(buckets.values())
    buckets["Python overhead (wall - ops)"] = max(wall - profiled, 0.0)

    print(f"machine: {describe()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(
        f"model: {source.path.name}, {len(model.model.layers)} layers; batch "
        f"{args.batch} x {args.seq}; LoRA r 8 on all seven projections; FP32; gradient "
        f"checkpointing {'on' if args.grad_checkpoint else 'off'}"
    )
    print(
        f"step: {plain:.3f} s unprofiled, {wall:.3f} s profiled "
        f"({args.batch * args.seq / plain:.0f} tokens/s unprofiled)\n"
    )
    print("| where | seconds | share of the profiled step |\n|---|---|---|")
    for name, sec in sorted(buckets.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {sec:.3f} | {sec / wall:.0%} |")
    top = sorted(others.items(), key=lambda kv: -kv[1])[:8]
    print("\nlargest other ops: " + ", ".join(f"{k} {v:.3f} s" for k, v in top))

    weights = collections.defaultdict(float)
    for name, t in list(model.named_buffers()) + list(model.named_parameters()):
        kind = "adapters" if "lora_" in name else "NF4 linears" if ".layers." in name else name
        weights[kind] += t.numel() * t.element_size() / 2**20
    print("\nWeights (MiB): " + ", ".join(f"{k} {v:.1f}" for k, v in weights.items()))
    saved = saved_for_backward(model, ids)
    print(
        f"Saved for backward (MiB, {sum(saved.values()):.0f} in all): "
        + ", ".join(f"{k} {v:.1f}" for k, v in sorted(saved.items(), key=lambda kv: -kv[1]))
    )
    logits_mib = args.batch * args.seq * vocab * 4 / 2**20
    print(f"\nMemory by phase (RSS MiB; one (B, T, vocab) FP32 tensor is {logits_mib:.0f} MiB):\n")
    print("| phase | RSS at start | peak in phase | RSS at end |\n|---|---|---|---|")
    for name, (b, p, e) in peaks.peaks.items():
        print(f"| {name} | {b} | {p} | {e} |")
    result = dict(step_s=plain, profiled_s=wall, tokens_per_s=args.batch * args.seq / plain)
    write_json(args.json, dict(result, buckets=dict(buckets), batch=args.batch, seq=args.seq))


if __name__ == "__main__":
    main()
