"""NF4 dequantization kernels (Triton). Loaded by file path; `cuda/` is not a Python package.

Computes:
  nf4_absmax_kernel:  absmax[i] = nested_map[codes[i]] * nested_scales[i // nested_blocksize] + offset
                      (double-quant reconstruction), multiply rounded, then add rounded. The launcher
                      passes enable_fp_fusion=False on GPUs so the two never fuse into an FMA.
  nf4_dequant_kernel: out[e] = (quant_map[code(e)] * absmax[e // blocksize]) in float32, cast to the
                      output dtype, for every flat element e of the weight.
Layout: packed uint8 (ceil(numel / 2),), element e in byte e // 2, HIGH nibble for even e (bitsandbytes);
  absmax float32 (n_blocks,) over the row-major flattened weight; out contiguous (numel,).
Test: pytest tests/backends/torch_backend/test_triton_kernels.py (runs under TRITON_INTERPRET=1 on CPU,
  bit-exact against nf4core.dequantize); on a GPU: python bench/gpu_check.py.
"""

import triton
import triton.language as tl


@triton.jit
def nf4_absmax_kernel(codes_ptr, scales_ptr, nested_map_ptr, offset, out_ptr, n_blocks,
                      nested_blocksize, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_blocks
    code = tl.load(codes_ptr + offs, mask=mask, other=0).to(tl.int32)
    value = tl.load(nested_map_ptr + code, mask=mask, other=0.0)
    scale = tl.load(scales_ptr + offs // nested_blocksize, mask=mask, other=0.0)
    scaled = value * scale
    tl.store(out_ptr + offs, scaled + offset, mask=mask)


@triton.jit
def nf4_dequant_kernel(packed_ptr, absmax_ptr, quant_map_ptr, out_ptr, numel, blocksize,
                       BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    byte = tl.load(packed_ptr + offs // 2, mask=mask, other=0).to(tl.int32)
    code = (byte >> ((1 - (offs % 2)) * 4).to(tl.int32)) & 0xF
    value = tl.load(quant_map_ptr + code, mask=mask, other=0.0)
    scale = tl.load(absmax_ptr + offs // blocksize, mask=mask, other=0.0)
    tl.store(out_ptr + offs, (value * scale).to(out_ptr.dtype.element_ty), mask=mask)
