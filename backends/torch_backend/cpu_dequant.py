"""NF4 dequantize on the CPU in C: one pass from packed codes to FP32 or BF16, for the training path.

What it computes: out[i] = quant_map[code i] * absmax[i // blocksize], rounded once in float32
(bit-exact with nf4core.decode_nf4), then, for BF16 output, rounded to nearest-even BF16 as torch's
`.to(torch.bfloat16)` rounds (NaN becomes 0x7FC0). Layout: the bitsandbytes one (two codes per
byte, the first in the high nibble); double-quant block scales rebuilt as ops_reference does.
The numpy decoder (ops_host) makes three passes for BF16 (gather, scale, cast); this makes one, with
AVX-512 (a 16-entry table in one register, `vpermps`) where the compiler targets it.

How it is built: the system C compiler (`cc`, or $CC), once per source version, into
$NF4_KERNEL_CACHE (default ~/.cache/nf4-qlora); ctypes loads it (no torch headers, no Python API:
one call per weight, on the calling thread; double-quant block scales are rebuilt in C too).
How it is trusted: in auto mode it self-checks once per process against ops_reference (bit for bit)
and is skipped with one warning line if it fails to build or disagrees. How to test it:
tests/backends/torch_backend/test_cpu_dequant.py (bit-exact against nf4core and torch's cast).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from .nf4_weight import NF4Weight

DTYPES = (torch.float32, torch.bfloat16)

SOURCE = r"""
#include <stdint.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

static inline uint16_t bf16_rne(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* Elements [start, stop) of a weight; start is a multiple of blocksize (which is even). */
static void decode(const uint8_t *packed, const float *absmax, const float *qmap,
                   int64_t start, int64_t stop, int64_t blocksize, float *f32, uint16_t *b16) {
    for (int64_t b0 = start; b0 < stop; b0 += blocksize) {
        const float s = absmax[b0 / blocksize];
        const int64_t b1 = b0 + blocksize < stop ? b0 + blocksize : stop;
        int64_t i = b0;
#ifdef __AVX512F__
        const __m512 table = _mm512_loadu_ps(qmap), scale = _mm512_set1_ps(s);
        const __m128i low4 = _mm_set1_epi8(0x0f);
        for (; i + 32 <= b1; i += 32) {
            __m128i bytes = _mm_loadu_si128((const __m128i *)(packed + i / 2));
            __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low4);
            __m128i lo = _mm_and_si128(bytes, low4);
            __m128i codes[2] = {_mm_unpacklo_epi8(hi, lo), _mm_unpackhi_epi8(hi, lo)};
            for (int h = 0; h < 2; ++h) {
                __m512 v = _mm512_mul_ps(
                    _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(codes[h]), table), scale);
                if (f32) {
                    _mm512_storeu_ps(f32 + i + 16 * h, v);
                } else {
                    __m512i u = _mm512_castps_si512(v);
                    __m512i bias = _mm512_add_epi32(
                        _mm512_set1_epi32(0x7fff),
                        _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)));
                    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
                    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
                    r = _mm512_mask_blend_epi32(nan, r, _mm512_set1_epi32(0x7fc0));
                    _mm256_storeu_si256((__m256i *)(b16 + i + 16 * h), _mm512_cvtepi32_epi16(r));
                }
            }
        }
#endif
        for (; i < b1; ++i) {
            const uint8_t byte = packed[i / 2];
            const float v = qmap[(i & 1) ? (byte & 15) : (byte >> 4)] * s;
            if (f32) f32[i] = v; else b16[i] = bf16_rne(v);
        }
    }
}

/* Double quant: absmax[b] = nested_map[code b] * scales[b / nested_blocksize] + offset,
   each operation rounded to float32 on its own (as ops_reference.block_absmax). */
void nf4_block_absmax(const uint8_t *codes, const float *nested_map, const float *scales,
                      int64_t n_blocks, int64_t nested_blocksize, float offset, float *out) {
    for (int64_t b = 0; b < n_blocks; ++b) {
        float scaled = nested_map[codes[b]] * scales[b / nested_blocksize];
        out[b] = scaled + offset;
    }
}

void nf4_decode_f32(const uint8_t *p, const float *a, const float *q, int64_t start,
                    int64_t stop, int64_t blocksize, float *out) {
    decode(p, a, q, start, stop, blocksize, out, 0);
}

void nf4_decode_bf16(const uint8_t *p, const float *a, const float *q, int64_t start,
                     int64_t stop, int64_t blocksize, uint16_t *out) {
    decode(p, a, q, start, stop, blocksize, 0, out);
}
"""

_FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fPIC", "-shared")


def cache_dir() -> Path:
    root = os.environ.get("NF4_KERNEL_CACHE") or Path.home() / ".cache" / "nf4-qlora"
    return Path(root) / "cpu"


@functools.cache
def library() -> ctypes.CDLL:
    """The compiled decoder (built on first use; RuntimeError if there is no working compiler)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler found (cc, gcc or $CC)")
    digest = hashlib.sha256((SOURCE + " ".join(_FLAGS) + compiler).encode()).hexdigest()[:16]
    target = cache_dir() / f"nf4_decode_{digest}.so"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            src, lib = Path(tmp) / "nf4_decode.c", Path(tmp) / "lib.so"
            src.write_text(SOURCE)
            done = subprocess.run(
                [compiler, *_FLAGS, str(src), "-o", str(lib)], capture_output=True, text=True
            )
            if done.returncode != 0:
                raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[:300]}")
            os.replace(lib, target)  # atomic: concurrent builders write the same bytes
    lib = ctypes.CDLL(str(target))
    args = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_void_p]
    for name in ("nf4_decode_f32", "nf4_decode_bf16"):
        getattr(lib, name).argtypes = args
        getattr(lib, name).restype = None
    lib.nf4_block_absmax.argtypes = (
        [ctypes.c_void_p] * 3
        + [ctypes.c_int64] * 2
        + [
            ctypes.c_float,
            ctypes.c_void_p,
        ]
    )
    lib.nf4_block_absmax.restype = None
    return lib


def block_absmax(w: NF4Weight) -> torch.Tensor:
    """float32 (n_blocks,) block scales (CPU), bit-exact with ops_reference.block_absmax."""
    if w.absmax is not None:
        return w.absmax.contiguous()
    codes, scales = w.nested_codes.contiguous(), w.nested_scales.contiguous()
    nested_map = w.nested_quant_map.contiguous()
    out = torch.empty(w.n_blocks, dtype=torch.float32)
    library().nf4_block_absmax(
        codes.data_ptr(),
        nested_map.data_ptr(),
        scales.data_ptr(),
        w.n_blocks,
        w.nested_blocksize,
        w.nested_offset,
        out.data_ptr(),
    )
    return out


def dequantize(w: NF4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W (CPU) in `dtype` (float32 or bfloat16) and its original shape, decoded in one pass on
    the calling thread (a thread pool costs more than it saves at the sizes of a model's linears;
    torch's matmuls use the cores)."""
    if dtype not in DTYPES or w.packed.device.type != "cpu":
        raise ValueError(f"the C decoder makes float32 or bfloat16 on the CPU, not {dtype}")
    lib = library()
    packed = w.packed.contiguous()
    absmax = block_absmax(w)
    qmap = w.quant_map.to(torch.float32).contiguous()
    out = torch.empty(w.numel, dtype=dtype)
    fn = lib.nf4_decode_f32 if dtype == torch.float32 else lib.nf4_decode_bf16
    fn(
        packed.data_ptr(),
        absmax.data_ptr(),
        qmap.data_ptr(),
        0,
        w.numel,
        w.blocksize,
        out.data_ptr(),
    )
    return out.reshape(w.shape)
