/* nf4_dequant.c: NF4 dequantize on the CPU in one pass, packed 4-bit codes to float32 or bfloat16
   (the training path's decoder; called through ctypes by backends/torch_backend/cpu_dequant.py).

   What it computes: out[i] = quant_map[code i] * absmax[i / blocksize], rounded once in float32
   (bit-exact with nf4core.decode_nf4), then, for bfloat16 output, rounded to nearest-even bfloat16 as
   torch's `.to(torch.bfloat16)` rounds (NaN becomes 0x7FC0). nf4_block_absmax rebuilds double-quant
   block scales as ops_reference.block_absmax does (compiled with -ffp-contract=off: no fused FMA).

   Layout assumptions (bitsandbytes' NF4): the weight flattened row-major; two codes per byte, the
   FIRST element in the HIGH nibble; blocks of `blocksize` consecutive elements (even); every pointer
   contiguous; quant_map is 16 float32. With AVX-512 the 16-entry table sits in one register
   (`vpermps`); elsewhere a scalar loop.

   How to test it: tests/backends/torch_backend/test_cpu_dequant.py (bit-exact against nf4core and
   torch's cast); in auto mode it also self-checks once per process against ops_reference. */

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
