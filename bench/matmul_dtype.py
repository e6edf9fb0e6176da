"""BF16 vs FP32 matmul on this CPU. Run with ONEDNN_MAX_CPU_ISA=AVX2|AVX512_CORE|... to see older ISAs."""
import torch, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import median_seconds
a, b = torch.randn(1024, 2048), torch.randn(2048, 2048)
t32 = median_seconds(lambda: a @ b, 5)
a16, b16 = a.bfloat16(), b.bfloat16()
t16 = median_seconds(lambda: a16 @ b16, 5)
f = 2*1024*2048*2048
print(f"fp32 {f/t32/1e9:.1f} GFLOP/s bf16 {f/t16/1e9:.1f} GFLOP/s bf16/fp32 time {t16/t32:.2f}")
