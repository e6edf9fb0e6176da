"""NVIDIA GPU check of the torch backend: kernel correctness first, then benchmarks, in one run.

  python bench/gpu_check.py [OUT_DIR]        # OUT_DIR defaults to $OUT, else ./gpu_check_out
  python bench/gpu_check.py --smoke OUT_DIR  # no GPU: tiny shapes on the CPU under TRITON_INTERPRET=1

Needs torch and triton only (no gguf: the lent GPU image has none). Sections that would start after
BUDGET_S seconds (default 420, env GPU_CHECK_BUDGET_S) are skipped and recorded as such, so one call
ends well inside the lent machine's 8 minutes.

First the device and the launch configurations it gets (launch_config.py), each launched once.
Correctness (pass/fail): Triton dequantize and double-quant absmax bit-exact with nf4core (every
blocksize, double quant on/off, odd shapes); fused forward, input-grad and GEMV kernels within the dtype
tolerance of dequantize-then-matmul in FP32 (M in 1, 3, 33; FP32, FP16, BF16); auto mode's kernel
self-checks all pass and NF4Linear takes the kernels on CUDA by itself; paged AdamW (state in pinned
host memory) equals torch.optim.AdamW.
Benchmarks (ours / peer in the same run): dequantize bandwidth vs a device-to-device copy; fused NF4
matmul vs BF16 F.linear at batch 1, 16, 512 for 4096x4096 and 4096x14336; QLoRA training step
tokens/s and peak memory vs BF16 LoRA on the same model. Last, what autotuning chose per kernel and
shape (autotune.py) and every candidate's time.
Each section is guarded: a failure is recorded and the next section runs. Results are rewritten to
OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md after every section.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

SMOKE = "--smoke" in sys.argv
if SMOKE:  # must precede the first triton import
    os.environ["TRITON_INTERPRET"] = "1"

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import nf4core
from backends.torch_backend import dispatch, launch_config, ops_reference, ops_triton
from backends.torch_backend.nf4_linear import NF4Linear
from backends.torch_backend.nf4_weight import NF4Weight
from backends.torch_backend.paged_adamw import PagedAdamW
from bench._timing import median_seconds
from bench.random_llama import random_llama_state

DEVICE = torch.device("cpu" if SMOKE else "cuda")
BUDGET_S = float(os.environ.get("GPU_CHECK_BUDGET_S", "420"))
TOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}  # relative to max |ref|


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def bits(t: torch.Tensor | np.ndarray) -> np.ndarray:
    a = t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else t
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def check_launch_configs() -> dict:
    """The capability, its shared-memory limit and each configuration the dispatcher picks for it,
    launched once (a fallback shows up as a warning in this section)."""
    cap = torch.cuda.get_device_capability() if DEVICE.type == "cuda" else None
    props = torch.cuda.get_device_properties(DEVICE) if DEVICE.type == "cuda" else None
    out = dict(
        capability=cap,
        table_limit=launch_config.SHARED_MEMORY_PER_BLOCK.get(cap),
        device_limit=getattr(props, "shared_memory_per_block_optin", None),
        launched=[],
    )
    t = nf4core.quantize(np.random.default_rng(4).standard_normal((70, 300)).astype(np.float32))
    w = NF4Weight.from_nf4(t, DEVICE)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for m in (1, 9, 17):
            x = torch.randn(m, 300, device=DEVICE).to(dtype)
            ops_triton.linear(x, w)
            ops_triton.linear_grad_input(torch.randn(m, 70, device=DEVICE).to(dtype), w)
            configs = launch_config.matmul_configs(cap, x.element_size(), m)
            out["launched"].append(
                dict(
                    dtype=str(dtype),
                    m=m,
                    matmul=[str(c) for c in configs],
                    gemv=[str(c) for c in launch_config.gemv_configs(cap)],
                )
            )
    sync()
    out["ok"] = out["device_limit"] is None or out["table_limit"] in (None, out["device_limit"])
    return out


def check_dequant() -> dict:
    rng = np.random.default_rng(0)
    failures, cases = [], 0
    shapes = (
        [(1,), (3, 37), (2, 2101)]
        if SMOKE
        else [(1,), (3, 37), (2, 2101), (257, 4099), (4096, 1000)]
    )
    for blocksize in (32, 64, 128, 256, 512, 1024, 2048, 4096):
        for dq in (True, False):
            for shape in shapes:
                t = nf4core.quantize(
                    (rng.standard_normal(shape) * 3).astype(np.float32), blocksize, dq
                )
                w = NF4Weight.from_nf4(t, DEVICE)
                cases += 1
                same_absmax = np.array_equal(
                    bits(ops_triton.block_absmax(w)), bits(t.block_absmax())
                )
                same = np.array_equal(bits(ops_triton.dequantize(w)), bits(nf4core.dequantize(t)))
                ref16 = torch.from_numpy(nf4core.dequantize(t)).to(torch.bfloat16)
                same16 = torch.equal(ops_triton.dequantize(w, torch.bfloat16).cpu(), ref16)
                if not (same and same_absmax and same16):
                    failures.append(
                        dict(
                            blocksize=blocksize,
                            double_quant=dq,
                            shape=shape,
                            absmax=same_absmax,
                            fp32=same,
                            bf16=same16,
                        )
                    )
    return dict(ok=not failures, cases=cases, failures=failures)


def check_matmuls() -> dict:
    rng = np.random.default_rng(1)
    n, k = (37, 100) if SMOKE else (1000, 4100)  # neither a multiple of a tile
    t = nf4core.quantize(rng.standard_normal((n, k)).astype(np.float32), 64, True)
    w = NF4Weight.from_nf4(t, DEVICE)
    dense = torch.from_numpy(nf4core.dequantize(t)).to(DEVICE)
    rows = []
    for dtype in TOL:
        wc = dense.to(dtype).float()
        for m in (1, 3, 33):
            x = torch.randn(m, k, device=DEVICE).to(dtype)
            g = torch.randn(m, n, device=DEVICE).to(dtype)
            results = {
                "forward": (ops_triton._matmul(x, w, True), x.float() @ wc.T),
                "input_grad": (ops_triton.linear_grad_input(g, w), g.float() @ wc),
            }
            if m <= ops_triton.GEMV_MAX_ROWS:
                results["gemv"] = (ops_triton.gemv(x, w), x.float() @ wc.T)
            for name, (got, want) in results.items():
                err = ((got.float() - want).abs().max() / want.abs().max()).item()
                rows.append(
                    dict(kernel=name, dtype=str(dtype), m=m, rel_err=err, ok=err <= TOL[dtype])
                )
    return dict(ok=all(r["ok"] for r in rows), rows=rows)


def check_dispatch_and_optimizer() -> dict:
    from backends.torch_backend import self_check

    # Auto mode's self-checks (first, so the call count below sees only the layer's own call).
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    passed = {
        f"{op} {str(d).split('.')[-1]}": self_check.trusted(op, d, DEVICE)
        for op in self_check.OPS
        for d in dtypes
    }
    out = {"self_checks_passed": passed}
    if DEVICE.type == "cuda":
        layer = NF4Linear.from_linear(torch.nn.Linear(256, 96)).to(DEVICE)
        calls = []
        original = ops_triton.linear
        ops_triton.linear = lambda *a: calls.append(1) or original(*a)
        try:
            y = layer(torch.randn(20, 256, device=DEVICE))
        finally:
            ops_triton.linear = original
        with dispatch.force_path("reference"):
            y_ref = layer(torch.randn(1, 256, device=DEVICE)) * 0 + y  # reference path runs on CUDA
        out["auto_dispatch_uses_triton"] = bool(calls)
        out["reference_path_on_cuda_runs"] = y_ref.shape == y.shape
    g = torch.Generator().manual_seed(0)
    params = [
        torch.nn.Parameter(torch.randn(s, generator=g).to(DEVICE)) for s in [(7,), (300, 301)]
    ]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = PagedAdamW(params, lr=1e-3, page_bytes=1 << 16, paged=True)
    ref_opt = torch.optim.AdamW(ref, lr=1e-3, weight_decay=0.01, foreach=False)
    for _step in range(20):
        for p, q in zip(params, ref):
            grad = torch.randn(p.shape, generator=g).to(DEVICE)
            p.grad, q.grad = grad, grad.clone()
        opt.step()
        ref_opt.step()
    err = max((p - q).abs().max().item() for p, q in zip(params, ref))
    state = opt.state[params[1]]["exp_avg"]
    out.update(
        paged_adamw_max_err=err,
        paged_adamw_ok=err <= 1e-6,
        state_on_host=state.device.type == "cpu",
        state_pinned=state.is_pinned() if DEVICE.type == "cuda" else None,
    )
    out["ok"] = (
        out["paged_adamw_ok"]
        and out.get("auto_dispatch_uses_triton", True)
        and all(passed.values())
    )
    return out


def bench_dequant() -> dict:
    n, k = (256, 512) if SMOKE else (14336, 4096)
    t = nf4core.quantize(
        np.random.default_rng(2).standard_normal((n, k)).astype(np.float32), 64, True
    )
    w = NF4Weight.from_nf4(t, DEVICE)
    out16 = torch.empty(n, k, dtype=torch.bfloat16, device=DEVICE)
    repeat = 2 if SMOKE else 20
    t_ours = median_seconds(lambda: ops_triton.dequantize(w, torch.bfloat16), repeat, sync=sync)
    t_ref = median_seconds(lambda: ops_reference.dequantize(w, torch.bfloat16), repeat, sync=sync)
    src = torch.empty_like(out16)
    t_copy = median_seconds(lambda: out16.copy_(src), repeat, sync=sync)
    moved = w.nbytes + out16.numel() * 2  # read 4-bit data + scales, write bf16
    copy_moved = 2 * out16.numel() * 2
    return dict(
        shape=[n, k],
        triton_s=t_ours,
        torch_reference_s=t_ref,
        copy_s=t_copy,
        triton_GBps=moved / t_ours / 1e9,
        copy_GBps=copy_moved / t_copy / 1e9,
        fraction_of_copy_bandwidth=(moved / t_ours) / (copy_moved / t_copy),
        triton_over_copy_time=t_ours / t_copy,
        reference_over_triton=t_ref / t_ours,
    )


def bench_matmul() -> list[dict]:
    rows = []
    shapes = [(64, 128)] if SMOKE else [(4096, 4096), (14336, 4096), (4096, 14336)]
    for n, k in shapes:
        t = nf4core.quantize(
            np.random.default_rng(3).standard_normal((n, k)).astype(np.float32), 64, True
        )
        w = NF4Weight.from_nf4(t, DEVICE)
        dense = torch.from_numpy(nf4core.dequantize(t)).to(DEVICE, torch.bfloat16)
        for m in (1, 17) if SMOKE else (1, 16, 512):
            x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
            repeat = 2 if SMOKE else 50
            t_ours = median_seconds(lambda: ops_triton.linear(x, w), repeat, sync=sync)
            t_bf16 = median_seconds(lambda: F.linear(x, dense), repeat, sync=sync)
            g = torch.randn(m, n, device=DEVICE, dtype=torch.bfloat16)
            t_grad = median_seconds(lambda: ops_triton.linear_grad_input(g, w), repeat, sync=sync)
            t_grad_bf16 = median_seconds(lambda: g @ dense, repeat, sync=sync)
            rows.append(
                dict(
                    out_features=n,
                    in_features=k,
                    batch=m,
                    fused_s=t_ours,
                    bf16_linear_s=t_bf16,
                    speedup_vs_bf16=t_bf16 / t_ours,
                    grad_fused_s=t_grad,
                    grad_bf16_s=t_grad_bf16,
                    grad_speedup=t_grad_bf16 / t_grad,
                )
            )
    return rows


def bench_train() -> list[dict]:
    from backends.engine import LoRASettings
    from backends.torch_backend.lora import apply_lora
    from backends.torch_backend.model import CausalLM
    from backends.torch_backend.train_step import Batch, TrainConfig, Trainer

    if SMOKE:
        dims = dict(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
        batch, seq = 2, 16
    else:
        dims = dict(
            vocab_size=32000,
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=8,
            num_attention_heads=32,
            num_key_value_heads=4,
        )
        batch, seq = 4, 1024
    cfg = nf4core.ModelConfig("llama", **dims, tie_word_embeddings=False)
    state = random_llama_state(cfg)
    rows = []
    for kind in ("qlora_nf4", "lora_bf16_base"):
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        model = CausalLM.from_state(
            cfg, state, quantize=kind == "qlora_nf4", compute_dtype=torch.bfloat16
        ).to(DEVICE)
        apply_lora(model, LoRASettings(r=16, alpha=32), adapter_dtype=torch.float32)
        model.gradient_checkpointing = True
        trainer = Trainer(model, TrainConfig())
        ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=DEVICE)
        step_s = median_seconds(
            lambda trainer=trainer: trainer.train_step([Batch(ids)], 1e-4),
            2 if SMOKE else 5,
            sync=sync,
        )
        peak = torch.cuda.max_memory_allocated() / 2**20 if DEVICE.type == "cuda" else None
        rows.append(
            dict(
                kind=kind,
                seconds_per_step=step_s,
                tokens_per_s=batch * seq / step_s,
                peak_mem_mb=peak,
            )
        )
        del model, trainer
    rows[0]["tokens_per_s_ratio_vs_bf16_lora"] = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]
    return rows


def report_autotune() -> dict:
    """What autotuning chose for each kernel and shape the sections above ran, and the timings of
    every candidate (ms), from this process (autotune.py; on by default on CUDA)."""
    from backends.torch_backend import autotune

    tuner = autotune.tuner(DEVICE)
    return dict(
        enabled=autotune.enabled(DEVICE),
        file=str(tuner.path),
        choices=tuner.choices(),
        timings_ms=tuner.timings,
    )


def to_markdown(results: dict) -> str:
    lines = [f"# gpu_check ({results['device']})", ""]
    for name, value in results["sections"].items():
        lines.append(f"## {name}")
        lines.append("```json")
        lines.append(json.dumps(value, indent=1, default=str))
        lines.append("```")
    return "\n".join(lines)


def main() -> int:
    args = [a for a in sys.argv[1:] if a != "--smoke"]
    out = Path(args[0] if args else os.environ.get("OUT") or "gpu_check_out")
    out.mkdir(parents=True, exist_ok=True)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device; run with --smoke for the CPU interpreter check", file=sys.stderr)
        return 2
    name = (
        torch.cuda.get_device_name() if DEVICE.type == "cuda" else "CPU (TRITON_INTERPRET=1 smoke)"
    )
    from importlib.metadata import version

    results = {
        "device": name,
        "torch": torch.__version__,
        "triton": version("triton"),
        "python": sys.version.split()[0],
        "sections": {},
    }
    sections = [
        ("device and launch configurations", check_launch_configs),
        ("correctness: dequantize", check_dequant),
        ("correctness: matmuls", check_matmuls),
        ("correctness: dispatch and paged AdamW", check_dispatch_and_optimizer),
        ("bench: dequantize", bench_dequant),
        ("bench: fused matmul", bench_matmul),
        ("bench: training step", bench_train),
        ("autotune: choices and timings", report_autotune),
    ]
    failed = False
    began = time.time()
    for title, fn in sections:
        start = time.time()
        if start - began > BUDGET_S:
            value = {"skipped": f"time budget of {BUDGET_S:.0f} s spent"}
            results["sections"][title] = value
            print(f"[{0:6.1f}s] {title}: skipped (time budget)", flush=True)
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                value = fn()
            except Exception:  # noqa: BLE001 - record and go on to the next section
                value = {"ok": False, "error": traceback.format_exc()}
        if isinstance(value, dict) and caught:
            value["warnings"] = sorted({str(w.message) for w in caught})
        if isinstance(value, dict) and value.get("ok") is False:
            failed = True
        results["sections"][title] = value
        print(
            f"[{time.time() - start:6.1f}s] {title}: "
            f"{'FAIL' if isinstance(value, dict) and value.get('ok') is False else 'done'}",
            flush=True,
        )
        (out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))
        (out / "gpu_check.md").write_text(to_markdown(results) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
