"""Fused NF4 dequantize + matmul (Triton). Loaded by file path; `cuda/` is not a Python package.

Computes C (M, N) = A (M, R) @ B (R, N) where B is the NF4 weight W dequantized tile by tile in
registers (never written to memory), in A's dtype, accumulating in float32:
  W_TRANSPOSED=True:  W is (N, R) and B = W^T  -> the forward       y  = x  @ W^T
  W_TRANSPOSED=False: W is (R, N) and B = W    -> the input grad   dx = dY @ W
Each weight element is quant_map[code] * absmax[block] in float32, rounded to A's dtype before the
dot, exactly as the reference dequantizes; only the summation order differs from torch.
Layout: W row-major with `w_cols` columns, flat element e = row * w_cols + col, its code in byte e // 2
  (HIGH nibble for even e), its scale absmax[e // blocksize] (float32, already reconstructed when
  double-quantized). Any M, N, R (no multiple-of-block requirement); A and C may be strided.
Test: pytest tests/backends/torch_backend/test_triton_kernels.py (TRITON_INTERPRET=1 on CPU, within
  the dtype tolerance of reference dequant-then-matmul in float32); on a GPU: python bench/gpu_check.py.
"""

import triton
import triton.language as tl


@triton.jit
def nf4_matmul_kernel(a_ptr, packed_ptr, absmax_ptr, quant_map_ptr, c_ptr, M, N, R,
                      stride_am, stride_ar, stride_cm, stride_cn, w_cols, blocksize,
                      W_TRANSPOSED: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                      BR: tl.constexpr):
    rm = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)  # (BM,)
    rn = tl.program_id(1).to(tl.int64) * BN + tl.arange(0, BN)  # (BN,)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for r0 in range(0, R, BR):
        rr = r0 + tl.arange(0, BR).to(tl.int64)  # (BR,)
        a_mask = (rm < M)[:, None] & (rr < R)[None, :]
        a = tl.load(a_ptr + rm[:, None] * stride_am + rr[None, :] * stride_ar, mask=a_mask, other=0.0)
        if W_TRANSPOSED:
            flat = rn[None, :] * w_cols + rr[:, None]  # (BR, BN): W[n, r]
        else:
            flat = rr[:, None] * w_cols + rn[None, :]  # (BR, BN): W[r, n]
        b_mask = (rr < R)[:, None] & (rn < N)[None, :]
        byte = tl.load(packed_ptr + flat // 2, mask=b_mask, other=0).to(tl.int32)
        code = (byte >> ((1 - (flat % 2)) * 4).to(tl.int32)) & 0xF
        value = tl.load(quant_map_ptr + code, mask=b_mask, other=0.0)
        scale = tl.load(absmax_ptr + flat // blocksize, mask=b_mask, other=0.0)
        b = (value * scale).to(a.dtype)
        acc = tl.dot(a, b, acc, input_precision="ieee")
    c_mask = (rm < M)[:, None] & (rn < N)[None, :]
    c_ptrs = c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)
