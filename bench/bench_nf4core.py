"""nf4core (numpy) vs bitsandbytes (CPU): quantize and dequantize one matrix, measured in the same run.

    python bench/bench_nf4core.py [--rows 4096] [--cols 4096] [--repeat 7] [--quick] [--json PATH]

Prints the best of `repeat` timings for each library and the ratio ours / theirs (< 1: we are faster).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import nf4core  # noqa: E402
from bench.machine import describe  # noqa: E402
from bench.results import add_json_option, write_json  # noqa: E402


def best_of(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--blocksize", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="256x256, best of 2 (a smoke test)")
    add_json_option(parser)
    args = parser.parse_args()
    if args.quick:
        args.rows, args.cols, args.repeat = 256, 256, 2

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import bitsandbytes.functional as F
    import torch

    w = np.random.default_rng(0).standard_normal((args.rows, args.cols)).astype(np.float32)
    w_torch = torch.from_numpy(w)
    print(f"machine: {describe()}; torch threads {torch.get_num_threads()}")
    print(
        f"matrix {args.rows}x{args.cols} float32, blocksize {args.blocksize}, best of {args.repeat}"
    )
    print("| operation | double quant | nf4core (ms) | bitsandbytes CPU (ms) | ratio ours/bnb |")
    print("|---|---|---|---|---|")
    results = []
    for double_quant in (False, True):
        ours_t = nf4core.quantize(w, args.blocksize, double_quant)
        packed, state = F.quantize_4bit(
            w_torch, blocksize=args.blocksize, quant_type="nf4", compress_statistics=double_quant
        )
        rows = {
            "quantize": (
                lambda: nf4core.quantize(w, args.blocksize, double_quant),
                lambda: F.quantize_4bit(
                    w_torch,
                    blocksize=args.blocksize,
                    quant_type="nf4",
                    compress_statistics=double_quant,
                ),
            ),
            "dequantize": (
                lambda: nf4core.dequantize(ours_t),
                lambda: F.dequantize_4bit(packed, state),
            ),
        }
        for name, (ours, theirs) in rows.items():
            t_ours, t_theirs = best_of(ours, args.repeat), best_of(theirs, args.repeat)
            print(
                f"| {name} | {'on' if double_quant else 'off'} | {t_ours * 1e3:.1f} | "
                f"{t_theirs * 1e3:.1f} | {t_ours / t_theirs:.2f} |"
            )
            results.append(
                dict(operation=name, double_quant=double_quant, ours_s=t_ours, peer_s=t_theirs)
            )
    write_json(args.json, dict(shape=[args.rows, args.cols], rows=results))


if __name__ == "__main__":
    main()
