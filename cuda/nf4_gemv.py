"""Small-batch NF4 forward y = x @ W^T (GEMV-like, Triton). Loaded by file path; not a package.

Computes y[m, n] = sum_k x[m, k] * W[n, k] for few rows m (decode, batch 1..8): one program per
(BN output features, row m), streaming the 4-bit weight once per row with no tensor-core tile padding.
Each weight element is quant_map[code] * absmax[block] in float32, rounded to x's dtype (as the
reference), products summed in float32.
Layout: W (N, K) row-major, flat element e = n * K + k, code in byte e // 2 (HIGH nibble for even e),
  scale absmax[e // blocksize] (float32, reconstructed); x (M, K) and y (M, N) with a row stride.
Test: pytest tests/backends/torch_backend/test_triton_kernels.py (TRITON_INTERPRET=1 on CPU); on a GPU:
  python bench/gpu_check.py.
"""

import triton
import triton.language as tl


@triton.jit
def nf4_gemv_kernel(x_ptr, packed_ptr, absmax_ptr, quant_map_ptr, y_ptr, N, K, stride_xm, stride_ym,
                    blocksize, BN: tl.constexpr, BK: tl.constexpr):
    rn = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN)  # (BN,)
    m = tl.program_id(1).to(tl.int64)
    acc = tl.zeros((BN, BK), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK).to(tl.int64)  # (BK,)
        x = tl.load(x_ptr + m * stride_xm + rk, mask=rk < K, other=0.0)
        mask = (rn < N)[:, None] & (rk < K)[None, :]
        flat = rn[:, None] * K + rk[None, :]  # (BN, BK)
        byte = tl.load(packed_ptr + flat // 2, mask=mask, other=0).to(tl.int32)
        code = (byte >> ((1 - (flat % 2)) * 4).to(tl.int32)) & 0xF
        value = tl.load(quant_map_ptr + code, mask=mask, other=0.0)
        scale = tl.load(absmax_ptr + flat // blocksize, mask=mask, other=0.0)
        w = (value * scale).to(x.dtype).to(tl.float32)
        acc += w * x.to(tl.float32)[None, :]
    y = tl.sum(acc, axis=1)
    tl.store(y_ptr + m * stride_ym + rn, y.to(y_ptr.dtype.element_ty), mask=rn < N)
