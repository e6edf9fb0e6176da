"""The Mac owner's check of the MLX backend's Metal kernels: correctness first, then speed.

    python bench/metal_check.py                 # on a Mac with Apple silicon
    python bench/metal_check.py --peak-gbps 400 # also report a fraction of the chip's rated bandwidth
    python bench/metal_check.py --cpu-smoke     # anywhere: runs the script on the plain-mlx reference
                                                # ops at small sizes (checks the script, not kernels)

1. Correctness: the Metal absmax and dequantize kernels equal nf4core bit for bit (blocksizes 32..4096,
   double quant on/off, odd shapes, float32/float16/bfloat16); the fused forward, small-batch (GEMV)
   and input-gradient kernels agree with the reference; NF4Linear gradients agree across the paths;
   auto mode's kernel self-checks (every op and dtype) pass.
   Any failure prints FAIL and the script exits with status 1.
2. Dequantize throughput in GB/s and as a fraction of a device-to-device copy (and of --peak-gbps).
3. Fused NF4 matmul vs mx.quantized_matmul (MLX's affine 4-bit, group 64) and vs a bfloat16 matmul.
4. QLoRA training-step tokens/s: NF4 base with the kernels, the reference path, and a bf16 base.
Without Metal (and without --cpu-smoke) it prints that it skipped and exits 0.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import nf4core  # noqa: E402
from backends.mlx_backend import dispatch, ops_reference
from backends.mlx_backend.nf4_linear import NF4Linear
from backends.mlx_backend.nf4_weight import NF4Weight
from bench._timing import median_seconds  # noqa: E402
from bench.machine import describe as machine  # noqa: E402
from bench.results import add_json_option, write_json  # noqa: E402

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 5e-2}  # relative to the output's scale
failures: list[str] = []


def report(ok: bool, what: str) -> None:
    print(f"  {'PASS' if ok else 'FAIL'}  {what}")
    if not ok:
        failures.append(what)


def bits(a: mx.array) -> np.ndarray:
    return np.array(a.view(mx.uint32 if a.dtype == mx.float32 else mx.uint16)).reshape(-1)


def np_bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint32 if a.dtype.itemsize == 4 else np.uint16).reshape(-1)


def check_correctness(ops, quick: bool) -> None:
    print("correctness:")
    rng = np.random.default_rng(0)
    blocksizes = (32, 64, 4096) if quick else nf4core.blockwise.ALLOWED_BLOCKSIZES
    for bs in blocksizes:
        for dq in (False, True):
            for shape in ((37, 129), (3, 4099)):
                t = nf4core.quantize(rng.standard_normal(shape).astype(np.float32), bs, dq)
                w = NF4Weight.from_nf4(t)
                ok = np.array_equal(bits(ops.reconstruct_absmax(w)), np_bits(t.block_absmax()))
                for name, dtype in DTYPES.items():
                    ok &= np.array_equal(
                        bits(ops.dequantize(w, dtype)), np_bits(nf4core.dequantize(t, name))
                    )
                report(bool(ok), f"dequantize bit-exact bs={bs} dq={dq} shape={shape} (3 dtypes)")
    for m in (1, 3, 8, 9, 130):
        for name, dtype in DTYPES.items():
            t = nf4core.quantize(rng.standard_normal((67, 257)).astype(np.float32), 64, True)
            w = NF4Weight.from_nf4(t)
            x = mx.array(rng.standard_normal((m, 257)).astype(np.float32)).astype(dtype)
            g = mx.array(rng.standard_normal((m, 67)).astype(np.float32)).astype(dtype)
            for op, arg in (("linear", x), ("linear_grad_input", g)):
                want = getattr(ops_reference, op)(arg.astype(mx.float32), w)
                for strategy in ("fused", "dequant"):
                    got = getattr(ops, op)(arg, w, strategy=strategy).astype(mx.float32)
                    scale = float(mx.abs(want).max()) or 1.0
                    err = float(mx.abs(got - want).max()) / scale
                    kind = "gemv" if op == "linear" and m <= 8 and strategy == "fused" else op
                    report(
                        err < TOLERANCE[name],
                        f"{kind} ({strategy}) M={m} {name}: max rel err {err:.2e}",
                    )
    layer = NF4Linear.from_dense(rng.standard_normal((96, 160)).astype(np.float32), blocksize=32)
    x = mx.array(rng.standard_normal((4, 7, 160)).astype(np.float32))
    grads = {}
    for path in ("auto", "reference"):
        with dispatch.force_path(path):
            grads[path] = mx.grad(lambda v: (layer(v) ** 2).sum())(x)
    err = float(mx.abs(grads["auto"] - grads["reference"]).max() / mx.abs(grads["reference"]).max())
    report(err < 1e-4, f"NF4Linear input gradient, kernels vs reference: rel err {err:.2e}")


def timed(fn) -> float:
    return median_seconds(lambda: mx.eval(fn()), repeat=10, warmup=3)


def bench_dequant(ops, size: tuple[int, int], peak_gbps: float | None) -> dict:
    print(f"dequantize {size[0]}x{size[1]} (double quant, bs 64) -> bfloat16:")
    t = nf4core.quantize(
        np.random.default_rng(1).standard_normal(size).astype(np.float32), 64, True
    )
    w = NF4Weight.from_nf4(t)
    s = timed(lambda: ops.dequantize(w, mx.bfloat16))
    moved = w.nbytes + t.numel * 2  # read the 4-bit codes and scales, write bfloat16
    gbps = moved / s / 1e9
    src = mx.zeros((t.numel,), dtype=mx.bfloat16)
    s_copy = timed(lambda: src + 0)  # a device copy: read and write bfloat16
    copy_gbps = 2 * t.numel * 2 / s_copy / 1e9
    line = (
        f"  {s * 1e3:.3f} ms, {gbps:.1f} GB/s = {gbps / copy_gbps:.2f} of a device copy "
        f"({copy_gbps:.1f} GB/s)"
    )
    if peak_gbps:
        line += f", {gbps / peak_gbps:.2f} of the rated {peak_gbps:.0f} GB/s"
    print(line)
    return dict(shape=list(size), ours_s=s, copy_s=s_copy, GBps=gbps, copy_GBps=copy_gbps)


def bench_matmul(ops, n: int, k: int, rows: tuple[int, ...]) -> list[dict]:
    print(f"matmul x (M, {k}) @ W^T, W ({n}, {k}), bfloat16 activations:")
    rng = np.random.default_rng(2)
    dense = (rng.standard_normal((n, k)) * 0.02).astype(np.float32)
    w = NF4Weight.from_nf4(nf4core.quantize(dense, 64, True))
    wb = mx.array(dense).astype(mx.bfloat16)
    wq, scales, biases = mx.quantize(wb, group_size=64, bits=4)
    print(
        "  | M | NF4 ours (auto) | NF4 fused kernel | mx.quantized_matmul affine 4-bit | bf16 matmul "
        "| ours/affine | ours/bf16 |"
    )
    results = []
    for m in rows:
        x = mx.array(rng.standard_normal((m, k)).astype(np.float32)).astype(mx.bfloat16)
        s_ours = timed(lambda x=x: ops.linear(x, w))
        s_fused = timed(lambda x=x: ops.linear(x, w, strategy="fused"))
        s_aff = timed(
            lambda x=x: mx.quantized_matmul(
                x, wq, scales, biases, transpose=True, group_size=64, bits=4
            )
        )
        s_bf16 = timed(lambda x=x: x @ wb.T)
        print(
            f"  | {m} | {s_ours * 1e3:.3f} ms | {s_fused * 1e3:.3f} ms | {s_aff * 1e3:.3f} ms "
            f"| {s_bf16 * 1e3:.3f} ms "
            f"| {s_ours / s_aff:.2f} | {s_ours / s_bf16:.2f} |"
        )
        results.append(dict(shape=[n, k], rows=m, ours_s=s_ours, affine_s=s_aff, bf16_s=s_bf16))
    return results


def bench_step(smoke: bool) -> dict:
    from mlx_step import small_config, step_tokens_per_second

    cfg = small_config(hidden=256, layers=2, vocab=1024) if smoke else small_config(1024, 8, 8192)
    batch, seq = (1, 64) if smoke else (4, 256)
    print(
        f"QLoRA step, {cfg.num_hidden_layers} layers x {cfg.hidden_size}, {batch}x{seq} tokens, r=16:"
    )
    runs = [
        ("NF4 base, kernels (auto)", "auto", True),
        ("NF4 base, reference ops", "reference", True),
        ("bf16/fp32 dense base", "auto", False),
    ]
    results = {}
    for label, path, quantize in runs:
        with dispatch.force_path(path):
            tps, peak = step_tokens_per_second(cfg, quantize, batch, seq, steps=2 if smoke else 5)
        results[label] = tps
        print(f"  {label}: {tps:.0f} tokens/s, peak {peak / 2**20:.0f} MiB")
    first, last = results[runs[0][0]], results[runs[-1][0]]
    print(f"  NF4 (kernels) / dense base speed: {first / last:.2f}")
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--peak-gbps",
        type=float,
        default=None,
        help="the chip's rated memory bandwidth, e.g. 100 (M1), 400 (M1 Max)",
    )
    parser.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="run on the reference ops at small sizes (no Metal needed)",
    )
    parser.add_argument("--quick", action="store_true", help="fewer correctness cases")
    add_json_option(parser)
    args = parser.parse_args()
    print(f"machine: {machine()}; mlx {mx.__version__}; Metal available: {mx.metal.is_available()}")
    if mx.metal.is_available():
        info = mx.metal.device_info()
        print(
            f"device: {info.get('architecture')}, memory {info.get('memory_size', 0) / 2**30:.0f} GiB"
        )
    if dispatch.metal_usable() and not args.cpu_smoke:
        from backends.mlx_backend import ops_metal as ops

        smoke = False
    elif args.cpu_smoke:
        ops, smoke = ops_reference, True
        print("CPU smoke run: the reference ops stand in for the kernels (checks this script only)")
    else:
        print(
            "SKIPPED: no Metal device is the default device, so there are no kernels to check here. "
            "The kernel bodies are tested on Linux by tests/backends/mlx_backend/test_metal_shim.py."
        )
        return 0
    check_correctness(ops, quick=args.quick or smoke)
    if not smoke:
        from backends.mlx_backend import self_check

        for op in self_check.OPS:
            for name, dtype in DTYPES.items():
                report(self_check.trusted(op, dtype), f"auto mode's self-check of {op} {name}")
    if failures:
        print(f"{len(failures)} check(s) FAILED; not measuring speed.")
        return 1
    results = dict(
        dequant=bench_dequant(ops, (256, 1024) if smoke else (4096, 14336), args.peak_gbps),
        matmul=bench_matmul(
            ops, *((256, 512, (1, 64)) if smoke else (4096, 4096, (1, 8, 128, 512, 2048)))
        ),
        step=bench_step(smoke),
    )
    write_json(args.json, results)
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
