"""BF16 vs FP32 matmul on this CPU (why FP32 is the CPU compute dtype).

  ONEDNN_MAX_CPU_ISA=AVX2|AVX512_CORE|AVX512_CORE_BF16|ALL python bench/matmul_dtype.py
caps oneDNN to an older instruction set, to see CPUs without AMX on an AMX machine.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._timing import median_seconds


def main() -> None:
    a, b = torch.randn(1024, 2048), torch.randn(2048, 2048)
    t32 = median_seconds(lambda: a @ b, 5)
    a16, b16 = a.bfloat16(), b.bfloat16()
    t16 = median_seconds(lambda: a16 @ b16, 5)
    flops = 2 * 1024 * 2048 * 2048
    print(
        f"(1024x2048)@(2048x2048): FP32 {flops / t32 / 1e9:.1f} GFLOP/s, BF16 {flops / t16 / 1e9:.1f} "
        f"GFLOP/s, BF16 / FP32 time {t16 / t32:.2f}"
    )


if __name__ == "__main__":
    main()
