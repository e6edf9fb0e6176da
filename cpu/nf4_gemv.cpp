// nf4_gemv.cpp: y (M, N) = x (M, K) @ W^T for an NF4 weight W (N, K), on the CPU, for few rows of x
// (decoding: M = 1..8), without materialising W.
//
// What it computes: every weight value is quant_map[code] * absmax[block] in float32, the same bits as
// nf4core.dequantize (and ops_reference.dequantize); with double quant each block's absmax is
// rebuilt as (nested_quant_map[nested_code] * nested_scale[block / nested_blocksize]) rounded to
// float32, then + offset, rounded again (the file is compiled with -ffp-contract=off so the compiler
// cannot fuse that pair into one FMA). Only the order of the dot product's sum differs from
// `x @ W.t()` (FMAs into several vector accumulators), so results agree within float32 rounding.
//
// Layout assumptions (bitsandbytes' NF4): W flattened row-major; two codes per byte, the FIRST element
// in the HIGH nibble; blocks of `blocksize` consecutive elements of the flattened weight (a block may
// span two rows when K is not a multiple of blocksize); packed holds (N*K + 1) / 2 bytes. x and y are
// contiguous float32, row-major. Blocksize must be even (the format's are 32..4096, powers of two).
//
// How it works: per output row, per block: the 16 code values times the block's absmax in a vector
// register (the exact dequantized values), then per 16 packed bytes a table lookup by the high and by
// the low nibbles (AVX-512 vpermps; AVX2: two vpermps and a blend) and FMAs with x split into its even
// and odd columns (done once per call, so the codes are never interleaved). Rows of W are spread over
// OpenMP threads (the OpenMP runtime torch itself loaded). Odd K (rows starting mid-byte) takes a scalar
// path. The ISA is picked at compile time (the build uses -march=native); nf4_gemv_isa() says which.
// nf4_gemv_group runs several weights that read the same x (a layer's q/k/v, gate/up) in one call,
// rearranging x once; each output column is summed exactly as a call for its weight alone would.
// nf4_decode_project wraps a group call with what a decode step does around it (fast_decode.py):
// RMSNorm of x first, the output added to a residual, RoPE and the KV cache write after.
//
// How to test it: tests/backends/torch_backend/test_cpu_gemv.py builds it (and its AVX2 and generic
// variants, with -mno-avx512f / -march=x86-64) and compares it with ops_reference.linear on odd shapes,
// blocksizes 32..4096, with and without double quant, 1..9 rows; test_fast_decode.py checks a group's
// columns against per-weight calls and decode steps against the torch module path. The plain C ABI is
// called through ctypes (backends/torch_backend/cpu_gemv.py), so the build needs only a C++ compiler,
// no torch headers.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define NF4_AVX512 1
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__)
#define NF4_AVX2 1
#include <immintrin.h>
#endif

namespace {

constexpr int kMaxRows = 4;  // rows of x per pass over W (more would spill the accumulators)

struct Weight {
  const uint8_t* packed;
  const float* absmax;           // per block, or nullptr with double quant
  const uint8_t* nested_codes;   // double quant: per block
  const float* nested_scales;    // per nested block
  const float* nested_map;       // 256 values
  float nested_offset;
  int64_t nested_blocksize;
  int nested_shift;              // log2(nested_blocksize), or -1 when it is not a power of two
  const float* quant_map;        // 16 values
  int64_t blocksize;
  int64_t N, K;
  int64_t ldy;                   // y's row stride (N, or the width of a group's joint output)
};

// The block scale, rounded exactly as ops_reference.block_absmax does: multiply, round, add, round
// (two roundings only because the build passes -ffp-contract=off; tests check it bit for bit).
inline float block_scale(const Weight& w, int64_t b) {
  if (w.absmax) return w.absmax[b];
  const int64_t nb = w.nested_shift >= 0 ? b >> w.nested_shift : b / w.nested_blocksize;
  const float scaled = w.nested_map[w.nested_codes[b]] * w.nested_scales[nb];
  return scaled + w.nested_offset;
}

// Any K (rows may start mid-byte): one element at a time.
void rows_scalar(const Weight& w, const float* x, int64_t M, float* y, int64_t n0, int64_t n1) {
  const int64_t K = w.K;
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * K;
      float acc = 0.0f;
      int64_t e = n * K;
      int64_t b = e / w.blocksize;
      float scale = block_scale(w, b);
      for (int64_t k = 0; k < K; ++k, ++e) {
        if (e / w.blocksize != b) {
          b = e / w.blocksize;
          scale = block_scale(w, b);
        }
        const uint8_t byte = w.packed[e >> 1];
        const int code = (e & 1) ? (byte & 0x0F) : (byte >> 4);
        const float value = w.quant_map[code] * scale;
        acc += value * xm[k];
      }
      y[m * w.ldy + n] = acc;
    }
  }
}

// Even K: x is split into its even columns xe (M, K/2) and odd columns xo (M, K/2); byte i of a row
// holds the codes of columns 2i (high nibble) and 2i+1 (low nibble). A row is a run of segments, each
// the row's bytes [i0, i1) that lie in one block (when K % blocksize == 0, whole blocks).
//
// Each ISA section defines Acc<M>: Acc(quant_map) (zeroed), segment(row, xe, xo, half, i0, i1, scale)
// (adds one stretch of a block) and store(y, ldy, n). rows_even below walks the blocks.
#if defined(NF4_AVX512)
constexpr const char* kIsa = "avx512";

template <int M>
struct Acc {
  __m512 hi[M], lo[M];
  __m512 codes;
  Acc(const float* quant_map) : codes(_mm512_loadu_ps(quant_map)) {
    for (int m = 0; m < M; ++m) hi[m] = lo[m] = _mm512_setzero_ps();
  }
  inline void step(__m512i bytes, __m512 table, const float* xe, const float* xo, int64_t half,
                   __mmask16 mask) {
    const __m512 vh = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table);
    const __m512 vl = _mm512_permutexvar_ps(_mm512_and_si512(bytes, _mm512_set1_epi32(0x0F)), table);
    for (int m = 0; m < M; ++m) {
      hi[m] = _mm512_fmadd_ps(vh, _mm512_maskz_loadu_ps(mask, xe + m * half), hi[m]);
      lo[m] = _mm512_fmadd_ps(vl, _mm512_maskz_loadu_ps(mask, xo + m * half), lo[m]);
    }
  }
  inline void segment(const uint8_t* row, const float* xe, const float* xo, int64_t half,
                      int64_t i0, int64_t i1, float scale) {
    const __m512 table = _mm512_mul_ps(codes, _mm512_set1_ps(scale));  // the dequantized values
    int64_t i = i0;
    for (; i + 16 <= i1; i += 16) {
      const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(row + i)));
      step(bytes, table, xe + i, xo + i, half, 0xFFFF);
    }
    if (i < i1) {
      const __mmask16 mask = (__mmask16)((1u << (i1 - i)) - 1u);
      step(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mask, row + i)), table, xe + i, xo + i, half, mask);
    }
  }
  inline void store(float* y, int64_t ldy, int64_t n) {
    for (int m = 0; m < M; ++m) y[m * ldy + n] = _mm512_reduce_add_ps(_mm512_add_ps(hi[m], lo[m]));
  }
};

// Whole blocks of a multiple of 64 elements (K % 64 == 0, blocksize % 64 == 0; the usual case): x is
// permuted per 64 columns so that xq[64g + 16r + j] = x[64g + 4j + r]; 32 packed bytes widen to 16
// lanes of two bytes each, and the four nibbles of a lane are looked up after shifts by 4, 0, 12 and 8
// (vpermps reads only the low four bits of each index): one widening per 64 weights, no masking.
constexpr bool kWide = true;

template <int M>
void rows_wide(const Weight& w, const float* xq, float* y, int64_t n0, int64_t n1) {
  const int64_t K = w.K, bs = w.blocksize;
  const __m512 codes = _mm512_loadu_ps(w.quant_map);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.packed + ((n * K) >> 1);
    __m512 acc[M][4];
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < 4; ++r) acc[m][r] = _mm512_setzero_ps();
    int64_t b = n * (K / bs);
    for (int64_t k0 = 0; k0 < K; k0 += bs, ++b) {
      const __m512 table = _mm512_mul_ps(codes, _mm512_set1_ps(block_scale(w, b)));
      for (int64_t k = k0; k < k0 + bs; k += 64) {
        const __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(row + (k >> 1))));
        const __m512 e0 = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table);
        const __m512 e1 = _mm512_permutexvar_ps(v, table);
        const __m512 e2 = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 12), table);
        const __m512 e3 = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 8), table);
        for (int m = 0; m < M; ++m) {
          const float* xm = xq + m * K + k;
          acc[m][0] = _mm512_fmadd_ps(e0, _mm512_loadu_ps(xm), acc[m][0]);
          acc[m][1] = _mm512_fmadd_ps(e1, _mm512_loadu_ps(xm + 16), acc[m][1]);
          acc[m][2] = _mm512_fmadd_ps(e2, _mm512_loadu_ps(xm + 32), acc[m][2]);
          acc[m][3] = _mm512_fmadd_ps(e3, _mm512_loadu_ps(xm + 48), acc[m][3]);
        }
      }
    }
    for (int m = 0; m < M; ++m)
      y[m * w.ldy + n] = _mm512_reduce_add_ps(
          _mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]), _mm512_add_ps(acc[m][2], acc[m][3])));
  }
}

#elif defined(NF4_AVX2)
constexpr const char* kIsa = "avx2";

inline __m256 lookup(__m256i idx, __m256 table_lo, __m256 table_hi) {
  const __m256 lo = _mm256_permutevar8x32_ps(table_lo, idx);
  const __m256 hi = _mm256_permutevar8x32_ps(table_hi, idx);
  return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));  // bit 3 -> sign
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

template <int M>
struct Acc {
  __m256 hi[M], lo[M];
  float tail[M];
  __m256 codes_lo, codes_hi;
  const float* quant_map;
  Acc(const float* qm) : codes_lo(_mm256_loadu_ps(qm)), codes_hi(_mm256_loadu_ps(qm + 8)), quant_map(qm) {
    for (int m = 0; m < M; ++m) {
      hi[m] = lo[m] = _mm256_setzero_ps();
      tail[m] = 0.0f;
    }
  }
  inline void segment(const uint8_t* row, const float* xe, const float* xo, int64_t half,
                      int64_t i0, int64_t i1, float scale) {
    const __m256 s = _mm256_set1_ps(scale);
    const __m256 table_lo = _mm256_mul_ps(codes_lo, s), table_hi = _mm256_mul_ps(codes_hi, s);
    const __m256i low_nibble = _mm256_set1_epi32(0x0F);
    int64_t i = i0;
    for (; i + 8 <= i1; i += 8) {
      int64_t raw;
      std::memcpy(&raw, row + i, 8);
      const __m256i bytes = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(raw));
      const __m256 vh = lookup(_mm256_srli_epi32(bytes, 4), table_lo, table_hi);
      const __m256 vl = lookup(_mm256_and_si256(bytes, low_nibble), table_lo, table_hi);
      for (int m = 0; m < M; ++m) {
        hi[m] = _mm256_fmadd_ps(vh, _mm256_loadu_ps(xe + m * half + i), hi[m]);
        lo[m] = _mm256_fmadd_ps(vl, _mm256_loadu_ps(xo + m * half + i), lo[m]);
      }
    }
    for (; i < i1; ++i) {
      const float vh = quant_map[row[i] >> 4] * scale, vl = quant_map[row[i] & 0x0F] * scale;
      for (int m = 0; m < M; ++m) tail[m] += vh * xe[m * half + i] + vl * xo[m * half + i];
    }
  }
  inline void store(float* y, int64_t ldy, int64_t n) {
    for (int m = 0; m < M; ++m) y[m * ldy + n] = hsum(_mm256_add_ps(hi[m], lo[m])) + tail[m];
  }
};

#else
constexpr const char* kIsa = "generic";

template <int M>
struct Acc {
  float acc[M][8] = {};
  const float* quant_map;
  Acc(const float* qm) : quant_map(qm) {}
  inline void segment(const uint8_t* row, const float* xe, const float* xo, int64_t half,
                      int64_t i0, int64_t i1, float scale) {
    float table[16];
    for (int c = 0; c < 16; ++c) table[c] = quant_map[c] * scale;
    for (int64_t i = i0; i < i1; ++i) {
      const float vh = table[row[i] >> 4], vl = table[row[i] & 0x0F];
      for (int m = 0; m < M; ++m) acc[m][i & 7] += vh * xe[m * half + i] + vl * xo[m * half + i];
    }
  }
  inline void store(float* y, int64_t ldy, int64_t n) {
    for (int m = 0; m < M; ++m) {
      float s = 0.0f;
      for (int j = 0; j < 8; ++j) s += acc[m][j];
      y[m * ldy + n] = s;
    }
  }
};
#endif

#if !defined(NF4_AVX512)
constexpr bool kWide = false;
template <int M>
void rows_wide(const Weight&, const float*, float*, int64_t, int64_t) {}
#endif

template <int M>
void rows_even(const Weight& w, const float* xe, const float* xo, float* y, int64_t n0, int64_t n1) {
  const int64_t K = w.K, bs = w.blocksize, half = K >> 1;
  const bool whole_blocks = K % bs == 0;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.packed + ((n * K) >> 1);
    Acc<M> acc(w.quant_map);
    const int64_t row_start = n * K;
    int64_t b = row_start / bs;
    if (whole_blocks) {
      for (int64_t i0 = 0; i0 < half; i0 += bs >> 1, ++b)
        acc.segment(row, xe, xo, half, i0, i0 + (bs >> 1), block_scale(w, b));
    } else {
      for (int64_t k0 = 0; k0 < K; ++b) {
        const int64_t end = (b + 1) * bs - row_start, k1 = end < K ? end : K;
        acc.segment(row, xe, xo, half, k0 >> 1, k1 >> 1, block_scale(w, b));
        k0 = k1;
      }
    }
    acc.store(y, w.ldy, n);
  }
}

// Threads only when the weight is big enough to pay for waking them (~128k weights).
inline bool worth_threads(const Weight& w) { return w.N * w.K >= (int64_t{1} << 17) && w.N >= 16; }

// Rows of W spread evenly over the threads; rows(n0, n1) computes outputs n0..n1-1.
template <typename Rows>
void run(const Weight& w, Rows&& rows) {
  const int64_t N = w.N;
#pragma omp parallel if (worth_threads(w))
  {
#if defined(_OPENMP)
    const int64_t threads = omp_get_num_threads(), me = omp_get_thread_num();
#else
    const int64_t threads = 1, me = 0;
#endif
    const int64_t per = (N + threads - 1) / threads;
    const int64_t n0 = me * per, n1 = n0 + per < N ? n0 + per : N;
    if (n0 < n1) rows(n0, n1);
  }
}

inline int log2_or_minus_one(int64_t v) {
  for (int s = 0; s < 62; ++s)
    if (v == (int64_t{1} << s)) return s;
  return -1;
}

// y (M, ldy) gets x (M, K) @ W_j^T for each weight j of ws, side by side: weight j's outputs in the
// columns after those of weights 0..j-1. x is rearranged once for all of them (they share K and the
// blocksize's wide/narrow choice); each weight's rows are summed exactly as a call of its own would.
int gemv(const Weight* ws, int64_t count, const float* x, int64_t M, int64_t K, float* y) {
  if (count <= 0) return -1;
  int64_t width = 0;
  bool wide = kWide && K % 64 == 0;
  for (int64_t j = 0; j < count; ++j) {
    const Weight& w = ws[j];
    if (M < 0 || K <= 0 || w.K != K || w.N < 0 || w.blocksize <= 0 || w.blocksize % 2 ||
        (!w.absmax && w.nested_blocksize <= 0))
      return -1;
    wide = wide && w.blocksize % 64 == 0;
    width += w.N;
  }
  for (int64_t j = 0; j < count; ++j)
    if (ws[j].ldy != width || (j > 0 && (ws[j].blocksize % 64 == 0) != (ws[0].blocksize % 64 == 0)))
      return -1;
  if (K % 2) {
    int64_t col = 0;
    for (int64_t j = 0; j < count; col += ws[j].N, ++j) {
      const Weight& w = ws[j];
#pragma omp parallel for schedule(static) if (worth_threads(w))
      for (int64_t n = 0; n < w.N; ++n) rows_scalar(w, x, M, y + col, n, n + 1);
    }
    return 0;
  }
  std::vector<float> split(kMaxRows * K);  // kMaxRows rows of x, rearranged for the row kernel
  const int64_t half = K / 2;
  for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
    const int rows = M - m0 < kMaxRows ? int(M - m0) : kMaxRows;
    float* xq = split.data();
    float* xe = split.data();  // narrow: even columns, then odd columns
    float* xo = split.data() + kMaxRows * half;
    for (int m = 0; m < rows; ++m) {
      const float* src = x + (m0 + m) * K;
      if (wide) {
        for (int64_t g = 0; g < K; g += 64)
          for (int r = 0; r < 4; ++r)
            for (int j = 0; j < 16; ++j) xq[m * K + g + 16 * r + j] = src[g + 4 * j + r];
      } else {
        for (int64_t i = 0; i < half; ++i) {
          xe[m * half + i] = src[2 * i];
          xo[m * half + i] = src[2 * i + 1];
        }
      }
    }
    int64_t col = 0;
    for (int64_t j = 0; j < count; col += ws[j].N, ++j) {
      const Weight& w = ws[j];
      float* out = y + m0 * width + col;
      if (wide) {
        switch (rows) {
          case 1: run(w, [&](int64_t a, int64_t b) { rows_wide<1>(w, xq, out, a, b); }); break;
          case 2: run(w, [&](int64_t a, int64_t b) { rows_wide<2>(w, xq, out, a, b); }); break;
          case 3: run(w, [&](int64_t a, int64_t b) { rows_wide<3>(w, xq, out, a, b); }); break;
          default: run(w, [&](int64_t a, int64_t b) { rows_wide<4>(w, xq, out, a, b); }); break;
        }
      } else {
        switch (rows) {
          case 1: run(w, [&](int64_t a, int64_t b) { rows_even<1>(w, xe, xo, out, a, b); }); break;
          case 2: run(w, [&](int64_t a, int64_t b) { rows_even<2>(w, xe, xo, out, a, b); }); break;
          case 3: run(w, [&](int64_t a, int64_t b) { rows_even<3>(w, xe, xo, out, a, b); }); break;
          default: run(w, [&](int64_t a, int64_t b) { rows_even<4>(w, xe, xo, out, a, b); }); break;
        }
      }
    }
  }
  return 0;
}

}  // namespace

extern "C" {

const char* nf4_gemv_isa() { return kIsa; }

// The scale of every block (n_blocks floats into out), as the GEMV computes it: for the tests, which
// compare it bit for bit with ops_reference.block_absmax.
void nf4_block_scales(const uint8_t* nested_codes, const float* nested_scales, const float* nested_map,
                      float nested_offset, int64_t nested_blocksize, int64_t n_blocks, float* out) {
  const int shift = log2_or_minus_one(nested_blocksize);
  const Weight w{nullptr, nullptr, nested_codes, nested_scales, nested_map, nested_offset,
                 nested_blocksize, shift, nullptr, 0, 0, 0, 0};
  for (int64_t b = 0; b < n_blocks; ++b) out[b] = block_scale(w, b);
}

// y (M, N) = x (M, K) @ W^T. absmax is nullptr when the block scales are double-quantized (then
// nested_codes, nested_scales and nested_map are given). Returns 0, or -1 for arguments it refuses.
int nf4_gemv_f32(const float* x, int64_t M, int64_t K, const uint8_t* packed, int64_t N, const float* absmax,
                 const uint8_t* nested_codes, const float* nested_scales, const float* nested_map,
                 float nested_offset, int64_t nested_blocksize, const float* quant_map, int64_t blocksize,
                 float* y) {
  const Weight w{packed, absmax, nested_codes, nested_scales, nested_map, nested_offset,
                 nested_blocksize, log2_or_minus_one(nested_blocksize), quant_map, blocksize, N, K, N};
  return gemv(&w, 1, x, M, K, y);
}

// One weight of a group, as nf4_gemv_f32 takes it (ctypes mirrors this struct in cpu_gemv.py).
struct nf4_group_weight {
  const uint8_t* packed;
  int64_t N;
  const float* absmax;
  const uint8_t* nested_codes;
  const float* nested_scales;
  const float* nested_map;
  float nested_offset;
  int64_t nested_blocksize;
  const float* quant_map;
  int64_t blocksize;
};

// Several weights that read the same x (q, k and v; gate and up) in one call: y (M, N_0 + ... ) holds
// x @ W_0^T, x @ W_1^T, ... side by side, each column the same bits as nf4_gemv_f32 gives it. All
// weights need the same K and all or none of their blocksizes a multiple of 64. 0, or -1 (refused).
int nf4_gemv_group(const float* x, int64_t M, int64_t K, const nf4_group_weight* group, int64_t count,
                   float* y) {
  if (count <= 0 || count > 64) return -1;
  Weight ws[64];
  int64_t width = 0;
  for (int64_t j = 0; j < count; ++j) width += group[j].N;
  for (int64_t j = 0; j < count; ++j) {
    const nf4_group_weight& g = group[j];
    ws[j] = Weight{g.packed, g.absmax, g.nested_codes, g.nested_scales, g.nested_map, g.nested_offset,
                   g.nested_blocksize, log2_or_minus_one(g.nested_blocksize), g.quant_map, g.blocksize,
                   g.N, K, width};
  }
  return gemv(ws, count, x, M, K, y);
}


// One projection of a decode step (backends/torch_backend/fast_decode.py), around a group call: the
// input RMS-normalised first (optional), the output written or added to y (a residual), then RoPE on
// its first rope_heads heads and the key and value heads copied into a KV cache at position p.
// Each float op is the one the torch ops do, rounded the same way (-ffp-contract=off): RMSNorm as
// weight * (x * (1 / sqrt(sum(x^2) / K + eps))) (only the order of that sum differs), RoPE as
// y * cos + rotate_half(y) * sin with sin's first half already negated (exact), the residual as y + out.
struct nf4_decode_projection {
  const nf4_group_weight* group;
  int64_t count;
  int64_t K;
  const float* norm_weight;  // (K,), or nullptr: no RMSNorm
  float eps;
  float* y;                  // (M, width), width = the group's summed N
  int64_t accumulate;        // 1: y += x W^T (a residual stream); 0: y = x W^T
  int64_t rope_heads;        // heads of head_dim columns rotated (q then k heads), 0: no RoPE
  int64_t kv_heads;          // the last kv_heads rotated heads are keys; the kv_heads after them values
  int64_t head_dim;
  const float* cos;          // (max_len, head_dim)
  const float* sin;          // (max_len, head_dim), first half negated
  float* k_cache;            // (M, kv_heads, max_len, head_dim), or nullptr
  float* v_cache;
  int64_t max_len;
};

int nf4_decode_project(const nf4_decode_projection* c, const float* x, int64_t M, int64_t p) {
  if (c->count <= 0 || c->count > 64 || M <= 0 || p < 0 || (c->rope_heads && p >= c->max_len)) return -1;
  const int64_t K = c->K;
  int64_t width = 0;
  for (int64_t j = 0; j < c->count; ++j) width += c->group[j].N;
  std::vector<float> normed;
  const float* in = x;
  if (c->norm_weight) {
    normed.resize(M * K);
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * K;
      float lanes[16] = {};
      for (int64_t k = 0; k < K; ++k) lanes[k & 15] += xm[k] * xm[k];
      float sum = 0.0f;
      for (int l = 0; l < 16; ++l) sum += lanes[l];
      const float mean = sum / float(K);
      const float r = 1.0f / std::sqrt(mean + c->eps);
      for (int64_t k = 0; k < K; ++k) {
        const float h = xm[k] * r;
        normed[m * K + k] = c->norm_weight[k] * h;
      }
    }
    in = normed.data();
  }
  Weight ws[64];
  for (int64_t j = 0; j < c->count; ++j) {
    const nf4_group_weight& g = c->group[j];
    ws[j] = Weight{g.packed, g.absmax, g.nested_codes, g.nested_scales, g.nested_map, g.nested_offset,
                   g.nested_blocksize, log2_or_minus_one(g.nested_blocksize), g.quant_map, g.blocksize,
                   g.N, K, width};
  }
  if (c->accumulate) {
    std::vector<float> out(M * width);
    const int status = gemv(ws, c->count, in, M, K, out.data());
    if (status) return status;
    for (int64_t i = 0; i < M * width; ++i) c->y[i] = c->y[i] + out[i];
  } else {
    const int status = gemv(ws, c->count, in, M, K, c->y);
    if (status) return status;
  }
  const int64_t D = c->head_dim, half = D / 2;
  if (c->rope_heads) {
    const float* cs = c->cos + p * D;
    const float* sn = c->sin + p * D;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t h = 0; h < c->rope_heads; ++h) {
        float* v = c->y + m * width + h * D;
        for (int64_t i = 0; i < half; ++i) {
          const float a = v[i], b = v[i + half];
          const float a_cos = a * cs[i], b_sin = b * sn[i];
          const float b_cos = b * cs[i + half], a_sin = a * sn[i + half];
          v[i] = a_cos + b_sin;
          v[i + half] = b_cos + a_sin;
        }
      }
  }
  if (c->k_cache) {
    const int64_t first_k = c->rope_heads - c->kv_heads;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t h = 0; h < c->kv_heads; ++h) {
        const int64_t at = ((m * c->kv_heads + h) * c->max_len + p) * D;
        std::memcpy(c->k_cache + at, c->y + m * width + (first_k + h) * D, D * sizeof(float));
        std::memcpy(c->v_cache + at, c->y + m * width + (c->rope_heads + h) * D, D * sizeof(float));
      }
  }
  return 0;
}

}  // extern "C"
