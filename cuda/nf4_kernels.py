"""NF4 kernels of the CUDA path (Triton). Loaded by file path: `cuda/` is not a Python package.

Computes, for an NF4 weight W in bitsandbytes' layout:
  nf4_absmax_kernel   absmax[i] = nested_map[codes[i]] * nested_scales[i // nested_blocksize] + offset
                      (double-quant reconstruction): multiply rounded, then add rounded. The launcher
                      passes enable_fp_fusion=False on GPUs, so no FMA changes the last bit.
  nf4_dequant_kernel  out[e] = quant_map[code(e)] * absmax[e // blocksize] in float32, rounded to the
                      output dtype, for every flat element e: bit-exact with nf4core.dequantize.
  nf4_matmul_kernel   C (M, N) = A (M, R) @ B (R, N), B being W dequantized tile by tile in registers
                      (never written out), rounded to A's dtype, accumulated in float32:
                      W_TRANSPOSED: W (N, R), B = W^T (forward y = x @ W^T); else W (R, N), B = W
                      (input gradient dx = dY @ W).
  nf4_gemv_kernel     y (M, N) = x (M, K) @ W^T for few rows (decode): one program per (BN features,
                      row), the 4-bit weight streamed once per row, no tensor-core tile padding.
Layout: W flattened row-major with `w_cols` columns; element e's code is in byte e // 2, the HIGH nibble
  for even e; its scale is absmax[e // blocksize] (float32; reconstructed first when double-quantized).
  Any M, N, K (no multiple-of-tile requirement). Blocksizes are compile-time constants (powers of
  two, so the block index is a shift); each blocksize in use compiles once. Rounding to bfloat16 is
  done explicitly (round-to-nearest-even on the bits), because Triton's interpreter truncates.
Test: pytest tests/backends/torch_backend/test_triton_kernels.py runs every kernel under
  TRITON_INTERPRET=1 on CPU tensors (dequant bit-exact vs nf4core; matmuls within the dtype tolerance of
  dequantize-then-matmul in float32); on an NVIDIA GPU: python bench/gpu_check.py.
"""

import triton
import triton.language as tl


@triton.jit
def _round_to(x, DTYPE: tl.constexpr):
    """float32 -> DTYPE, round to nearest even (finite inputs)."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def _decode(packed_ptr, absmax_ptr, quant_map_ptr, flat, mask, BLOCKSIZE: tl.constexpr):
    """float32 values of the flat element indices `flat` (any shape); 0 where masked."""
    byte = tl.load(packed_ptr + flat // 2, mask=mask, other=0).to(tl.int32)
    code = (byte >> ((1 - (flat % 2)) * 4).to(tl.int32)) & 0xF
    value = tl.load(quant_map_ptr + code, mask=mask, other=0.0)
    scale = tl.load(absmax_ptr + flat // BLOCKSIZE, mask=mask, other=0.0)
    return value * scale


@triton.jit
def nf4_absmax_kernel(
    codes_ptr,
    scales_ptr,
    nested_map_ptr,
    offset,
    out_ptr,
    n_blocks,
    NESTED_BLOCKSIZE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_blocks
    code = tl.load(codes_ptr + offs, mask=mask, other=0).to(tl.int32)
    value = tl.load(nested_map_ptr + code, mask=mask, other=0.0)
    scale = tl.load(scales_ptr + offs // NESTED_BLOCKSIZE, mask=mask, other=0.0)
    scaled = value * scale
    tl.store(out_ptr + offs, scaled + offset, mask=mask)


@triton.jit
def nf4_dequant_kernel(
    packed_ptr,
    absmax_ptr,
    quant_map_ptr,
    out_ptr,
    numel,
    BLOCKSIZE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    values = _decode(packed_ptr, absmax_ptr, quant_map_ptr, offs, mask, BLOCKSIZE)
    tl.store(out_ptr + offs, _round_to(values, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _matmul_step(
    acc,
    r0,
    a_ptr,
    packed_ptr,
    absmax_ptr,
    quant_map_ptr,
    rm,
    rn,
    M,
    N,
    R,
    stride_am,
    stride_ar,
    w_cols,
    BLOCKSIZE: tl.constexpr,
    W_TRANSPOSED: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    BR: tl.constexpr,
):
    """acc (BM, BN) += A[rm, r0:r0+BR] @ B[r0:r0+BR, rn]."""
    rr = r0 + tl.arange(0, BR).to(tl.int64)  # (BR,)
    a_mask = (rm < M)[:, None] & (rr < R)[None, :]
    a = tl.load(a_ptr + rm[:, None] * stride_am + rr[None, :] * stride_ar, mask=a_mask, other=0.0)
    if W_TRANSPOSED:
        flat = rn[None, :] * w_cols + rr[:, None]  # (BR, BN): W[n, r]
    else:
        flat = rr[:, None] * w_cols + rn[None, :]  # (BR, BN): W[r, n]
    b_mask = (rr < R)[:, None] & (rn < N)[None, :]
    b = _round_to(
        _decode(packed_ptr, absmax_ptr, quant_map_ptr, flat, b_mask, BLOCKSIZE),
        a_ptr.dtype.element_ty,
    )
    if DOT_FP32:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def nf4_matmul_kernel(
    a_ptr,
    packed_ptr,
    absmax_ptr,
    quant_map_ptr,
    c_ptr,
    M,
    N,
    R,
    stride_am,
    stride_ar,
    stride_cm,
    stride_cn,
    w_cols,
    BLOCKSIZE: tl.constexpr,
    W_TRANSPOSED: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    WHILE_LOOP: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BR: tl.constexpr,
):
    # DOT_FP32: feed the dot float32 copies of the (already rounded) operands: the launcher sets it
    # only under the interpreter, whose dot cannot multiply bfloat16; the products are the same.
    # PRECISION: "ieee" for float32 operands (no TF32 rounding), the default otherwise.
    # WHILE_LOOP: the launcher sets it only under the interpreter: Triton <= 3.6's interpreter
    # cannot take range() over a runtime bound with numpy >= 2.4 (the bound is a 1-element array).
    # Compiled kernels keep the for loop, which Triton software-pipelines.
    rm = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)  # (BM,)
    rn = tl.program_id(1).to(tl.int64) * BN + tl.arange(0, BN)  # (BN,)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if WHILE_LOOP:
        r0 = 0
        while r0 < R:
            acc = _matmul_step(
                acc,
                r0,
                a_ptr,
                packed_ptr,
                absmax_ptr,
                quant_map_ptr,
                rm,
                rn,
                M,
                N,
                R,
                stride_am,
                stride_ar,
                w_cols,
                BLOCKSIZE,
                W_TRANSPOSED,
                DOT_FP32,
                PRECISION,
                BR,
            )
            r0 += BR
    else:
        for r0 in range(0, R, BR):
            acc = _matmul_step(
                acc,
                r0,
                a_ptr,
                packed_ptr,
                absmax_ptr,
                quant_map_ptr,
                rm,
                rn,
                M,
                N,
                R,
                stride_am,
                stride_ar,
                w_cols,
                BLOCKSIZE,
                W_TRANSPOSED,
                DOT_FP32,
                PRECISION,
                BR,
            )
    c_mask = (rm < M)[:, None] & (rn < N)[None, :]
    c_ptrs = c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    tl.store(c_ptrs, _round_to(acc, c_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _gemv_step(
    acc,
    k0,
    x_ptr,
    packed_ptr,
    absmax_ptr,
    quant_map_ptr,
    rn,
    m,
    N,
    K,
    stride_xm,
    BLOCKSIZE: tl.constexpr,
    BK: tl.constexpr,
):
    """acc (BN, BK) += W[rn, k0:k0+BK] * x[m, k0:k0+BK], elementwise in float32."""
    rk = k0 + tl.arange(0, BK).to(tl.int64)  # (BK,)
    x = tl.load(x_ptr + m * stride_xm + rk, mask=rk < K, other=0.0).to(tl.float32)
    mask = (rn < N)[:, None] & (rk < K)[None, :]
    w = _decode(
        packed_ptr, absmax_ptr, quant_map_ptr, rn[:, None] * K + rk[None, :], mask, BLOCKSIZE
    )  # (BN, BK)
    w = _round_to(w, x_ptr.dtype.element_ty).to(tl.float32)
    return acc + w * x[None, :]


@triton.jit
def nf4_gemv_kernel(
    x_ptr,
    packed_ptr,
    absmax_ptr,
    quant_map_ptr,
    y_ptr,
    N,
    K,
    stride_xm,
    stride_ym,
    BLOCKSIZE: tl.constexpr,
    WHILE_LOOP: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    rn = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN)  # (BN,)
    m = tl.program_id(1).to(tl.int64)
    acc = tl.zeros((BN, BK), dtype=tl.float32)
    if WHILE_LOOP:  # see nf4_matmul_kernel
        k0 = 0
        while k0 < K:
            acc = _gemv_step(
                acc,
                k0,
                x_ptr,
                packed_ptr,
                absmax_ptr,
                quant_map_ptr,
                rn,
                m,
                N,
                K,
                stride_xm,
                BLOCKSIZE,
                BK,
            )
            k0 += BK
    else:
        for k0 in range(0, K, BK):
            acc = _gemv_step(
                acc,
                k0,
                x_ptr,
                packed_ptr,
                absmax_ptr,
                quant_map_ptr,
                rn,
                m,
                N,
                K,
                stride_xm,
                BLOCKSIZE,
                BK,
            )
    y = tl.sum(acc, axis=1)
    tl.store(y_ptr + m * stride_ym + rn, _round_to(y, y_ptr.dtype.element_ty), mask=rn < N)
