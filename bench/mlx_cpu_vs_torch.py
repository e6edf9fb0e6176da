"""MLX backend on the CPU vs torch on the CPU: the same op side by side in one run (ours / peer).

    python bench/mlx_cpu_vs_torch.py [--size 4096] [--tokens 256] [--quick] [--json PATH]

Ops: NF4 dequantize (double quant, blocksize 64) in MLX (our reference path), in plain torch (the same
algorithm) and in bitsandbytes' CPU kernel; NF4 linear forward and forward+input-gradient vs a dense
float32 linear in each framework; a QLoRA training step of a small model vs the same LoRA run on a
dense float32 base (MLX).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import nf4core  # noqa: E402
from backends.mlx_backend import ops_reference
from backends.mlx_backend.nf4_linear import NF4Linear
from bench._timing import median_seconds  # noqa: E402
from bench.machine import describe as machine  # noqa: E402
from bench.results import add_json_option, write_json  # noqa: E402


def torch_dequantize(packed, codes8, nested, offset, dq_map, table, numel, blocksize):
    """The same spec in plain torch: absmax from the 8-bit codes, then a byte -> pair lookup."""
    absmax = dq_map[codes8.long()] * nested.repeat_interleave(256)[: codes8.numel()]
    absmax = absmax + offset
    pairs = table[packed.long()].reshape(-1)[:numel]  # (numel,)
    return (pairs.reshape(-1, blocksize) * absmax[:, None]).reshape(-1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=4096, help="square weight for dequantize")
    parser.add_argument("--linear", type=int, default=2048, help="square weight for the linear")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument(
        "--no-step",
        dest="step",
        action="store_false",
        help="skip the QLoRA training-step comparison",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, no step (smoke test)")
    add_json_option(parser)
    args = parser.parse_args()
    if args.quick:
        args.size, args.linear, args.tokens, args.step = 512, 256, 16, False
    print(
        f"machine: {machine()}; mlx {mx.__version__}, torch {torch.__version__}, "
        f"torch threads {torch.get_num_threads()}"
    )

    rng = np.random.default_rng(0)
    n = args.size
    w = (rng.standard_normal((n, n)) * 0.02).astype(np.float32)
    t = nf4core.quantize(w, blocksize=64, double_quant=True)
    layer = NF4Linear.from_nf4(t)
    dq = t.double_quant
    table = torch.from_numpy(
        np.stack(
            [t.quant_map[np.arange(256) >> 4], t.quant_map[np.arange(256) & 15]], axis=1
        ).copy()
    )
    targs = (
        torch.from_numpy(t.packed.copy()),
        torch.from_numpy(dq.codes.copy()),
        torch.from_numpy(dq.scales.copy()),
        torch.tensor(dq.offset, dtype=torch.float32),
        torch.from_numpy(dq.quant_map.copy()),
        table,
        t.numel,
        64,
    )
    assert np.array_equal(torch_dequantize(*targs).numpy(), nf4core.dequantize(t).reshape(-1))

    results = []
    s_mlx = median_seconds(lambda: mx.eval(ops_reference.dequantize(layer.nf4)))
    s_torch = median_seconds(lambda: torch_dequantize(*targs))
    s_np = median_seconds(lambda: nf4core.dequantize(t), repeat=3)
    results.append((f"dequantize {n}x{n} -> fp32", s_mlx, s_torch, "torch (same algorithm)"))
    results.append((f"dequantize {n}x{n} -> fp32", s_mlx, s_np, "nf4core numpy"))
    try:
        import bitsandbytes.functional as F

        q, state = F.quantize_4bit(
            torch.from_numpy(w), blocksize=64, quant_type="nf4", compress_statistics=True
        )
        s_bnb = median_seconds(lambda: F.dequantize_4bit(q, state))
        results.append((f"dequantize {n}x{n} -> fp32", s_mlx, s_bnb, "bitsandbytes CPU"))
    except (ImportError, RuntimeError, ValueError) as exc:  # bitsandbytes is optional here
        print(f"bitsandbytes skipped: {exc}")

    k, m = args.linear, args.tokens
    wl = (rng.standard_normal((k, k)) * 0.02).astype(np.float32)
    tl = nf4core.quantize(wl, blocksize=64, double_quant=True)
    lin = NF4Linear.from_nf4(tl)
    x_np = rng.standard_normal((m, k)).astype(np.float32)
    x = mx.array(x_np)
    dense = mx.array(nf4core.dequantize(tl))
    xt = torch.from_numpy(x_np)
    targs_l = (
        torch.from_numpy(tl.packed.copy()),
        torch.from_numpy(tl.double_quant.codes.copy()),
        torch.from_numpy(tl.double_quant.scales.copy()),
        torch.tensor(tl.double_quant.offset),
        torch.from_numpy(tl.double_quant.quant_map.copy()),
        table,
        tl.numel,
        64,
    )
    wt_dense = torch.from_numpy(nf4core.dequantize(tl))

    def torch_nf4_linear(inp):
        return torch.nn.functional.linear(inp, torch_dequantize(*targs_l).reshape(k, k))

    s_mlx = median_seconds(lambda: mx.eval(lin(x)))
    s_torch = median_seconds(lambda: torch_nf4_linear(xt))
    results.append((f"NF4 linear fwd ({m}x{k} @ {k}x{k})", s_mlx, s_torch, "torch dequant+linear"))
    s_mlx_dense = median_seconds(lambda: mx.eval(x @ dense.T))
    s_torch_dense = median_seconds(lambda: torch.nn.functional.linear(xt, wt_dense))
    results.append((f"NF4 linear fwd ({m}x{k} @ {k}x{k})", s_mlx, s_mlx_dense, "MLX dense fp32"))
    results.append(
        (f"dense fp32 linear ({m}x{k} @ {k}x{k})", s_mlx_dense, s_torch_dense, "torch dense fp32")
    )

    grad_mlx = mx.grad(lambda v: lin(v).sum())
    s_mlx_b = median_seconds(lambda: mx.eval(grad_mlx(x)))
    xg = xt.clone().requires_grad_(True)

    def torch_fb():
        xg.grad = None
        torch_nf4_linear(xg).sum().backward()

    s_torch_b = median_seconds(torch_fb)
    results.append(
        (f"NF4 linear fwd+input grad ({m}x{k})", s_mlx_b, s_torch_b, "torch dequant+linear")
    )

    step = None
    if args.step:
        from mlx_step import small_config, step_tokens_per_second

        cfg = small_config(hidden=256, layers=4, vocab=2048)
        q_tps, q_peak = step_tokens_per_second(cfg, True, batch=2, seq=128, compute_dtype="float32")
        d_tps, d_peak = step_tokens_per_second(
            cfg, False, batch=2, seq=128, compute_dtype="float32"
        )
        step = dict(nf4_tokens_per_s=q_tps, dense_tokens_per_s=d_tps)
        print(
            f"\nQLoRA step, {cfg.num_hidden_layers}x{cfg.hidden_size} Llama, 2x128 tokens, r=16, "
            "fp32: "
            f"NF4 base {q_tps:.0f} tok/s (peak {q_peak / 2**20:.0f} MiB), dense fp32 base "
            f"{d_tps:.0f} tok/s (peak {d_peak / 2**20:.0f} MiB); NF4/dense speed {q_tps / d_tps:.2f}"
        )

    print("\n| op | MLX (ours) | peer | peer time | ours / peer |")
    print("|---|---|---|---|---|")
    for name, ours, peer, peer_name in results:
        print(
            f"| {name} | {ours * 1e3:.2f} ms | {peer_name} | {peer * 1e3:.2f} ms | {ours / peer:.2f} |"
        )
    rows = [dict(op=op, ours_s=o, peer=name, peer_s=p) for op, o, p, name in results]
    write_json(args.json, dict(rows=rows, step=step))


if __name__ == "__main__":
    main()
