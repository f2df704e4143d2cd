// int4 / int8 x int8 GEMM/GEMV on AVX2 over ORT MatMulNBits' own weight layout (symmetric, no zero points):
//   bits 4: B uint8 [N, K/blk, blk/2]  byte j of a block holds element 2j (low nibble) and 2j+1 (high nibble)
//           w = (code - 8) * scale
//   bits 8: B uint8 [N, K/blk, blk]    w = (code - 128) * scale
//   scales float [N, K/blk]
// A is quantized per block of `blk` K values to int8 (scale = amax/127, round to nearest even), as MatMulNBits
// does at accuracy_level 4, so both compute the same integer dot products per block.
//
// int4 -- why it is faster than MLAS's AVX2 path on one row: codes stay unsigned (0..15) and go straight into
// vpmaddubsw (unsigned x signed); the zero point 8 is folded in once per block as -8 * sum(qa). The nibble
// order is absorbed by storing each 64-element chunk of quantized A as [even elements | odd elements], so a
// 32-byte load of B splits into two vectors with one and + one shift + one and, no shuffles.
// int8 -- codes become signed (code ^ 0x80 = code - 128) and go through vpmaddubsw as |w| x sign(qa, w), as
// llama.cpp's Q8_0 kernel does (a pair stays within int16: 2 * 128 * 127); prefetching ahead is what gains there.
// The VNNI build keeps int8 codes unsigned like int4 (vpdpbusd sums in int32, nothing saturates) and folds the
// zero point 128 in per block: the same total per block, split differently over the vector lanes, so its int8
// results equal the AVX2 build's within float rounding (bit-for-bit where the sums are exact); its int4 ones
// are bit-identical.
#pragma once
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stddef.h>

// One header, two instruction sets: nbits_avx2_op.cpp includes it as `qvl::avx2`, nbits_vnni.cpp (compiled for
// AVX-512 VNNI) as `qvl::vnni` with QVL_VNNI set, where the int8 dot products of a block become vpdpbusd. Each
// translation unit's inline functions live in its own namespace, so the linker never mixes the two.
#ifndef QVL_ISA
#define QVL_ISA avx2
#endif
#ifndef QVL_VNNI
#define QVL_VNNI 0
#endif

namespace qvl {

// Quantized activations of one row: K int8 values (chunk-permuted), one float scale and one int32
// "-zp * sum(qa)" per block (zp 8 for int4, 128 for int8; the AVX2 int8 path does not use it).
struct QuantRow {
  int8_t* q;
  float* scale;
  int32_t* zp_term;
};

// Y[M, N] = A x W^T over output columns, for `columns` / `run_columns` below.
struct Job {
  const QuantRow* rows;
  int M, K, blk, bits, N, chunk;
  const uint8_t* B;
  const float* scales;
  float* Y;
  bool vnni;  // run by the VNNI build (nbits_avx2_op.cpp's run_columns dispatches on it)
};

void vnni_run_columns(const Job& j, int n0, int n1);  // nbits_vnni.cpp

namespace QVL_ISA {

// Software prefetch distance along B (rows are contiguous, so it runs on into the next rows): on the 2-core AVX2
// host, weights streamed from DRAM went from ~1.13x to ~1.3x MLAS's speed with 2-4 KiB ahead
// (benchmarks/README.md, "qvl's int4 kernel").
#ifndef QVL_PREFETCH_BYTES
#define QVL_PREFETCH_BYTES 2048
#endif
constexpr int kPrefetchBytes = QVL_PREFETCH_BYTES;

inline float hmax_ps(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

inline float hsum_ps(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// blk is a multiple of 64 (int4: `permuted`, each 64-element chunk stored as [even | odd elements]) or of 32
// (int8: plain order); K a multiple of blk.
inline void quantize_row(const float* a, int K, int blk, bool permuted, QuantRow out) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int b = 0; b < K / blk; ++b) {
    const float* x = a + (size_t)b * blk;
    __m256 amax = _mm256_setzero_ps();
    for (int i = 0; i < blk; i += 8) amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i)));
    const float m = hmax_ps(amax);
    const float scale = m / 127.0f;
    const float inv = m != 0.0f ? 127.0f / m : 0.0f;
    out.scale[b] = scale;
    int32_t sum = 0;
    int8_t* q = out.q + (size_t)b * blk;
    if (!permuted) {
      for (int i = 0; i < blk; ++i) {
        const int v = (int)nearbyintf(x[i] * inv);
        q[i] = (int8_t)v;
        sum += v;
      }
    }
    for (int c = 0; permuted && c < blk; c += 64) {
      for (int j = 0; j < 32; ++j) {
        // nearbyintf: round half to even under the default rounding mode, as _mm256_cvtps_epi32 does
        const int lo = (int)nearbyintf(x[c + 2 * j] * inv);
        const int hi = (int)nearbyintf(x[c + 2 * j + 1] * inv);
        q[c + j] = (int8_t)lo;
        q[c + 32 + j] = (int8_t)hi;
        sum += lo + hi;
      }
    }
    out.zp_term[b] = (permuted ? -8 : -128) * sum;  // the int4 / int8 zero point times sum(qa)
  }
}

// Rows [n0, n1) of Y = A x W^T for R rows of A at once (R = 1..4): each 32-byte load of B feeds R rows. The
// block size is a template argument: with it known the compiler unrolls the block's loads (about 1.8x faster
// than a runtime block length at one row).
template <int R, int blk>
inline void gemm4_rows(const QuantRow* qa, int K, const uint8_t* B, const float* scales, const float* bias,
                      int n0, int n1, float* const* y) {
  const int nblk = K / blk;
  const __m256i low = _mm256_set1_epi8(0x0F);
#if !QVL_VNNI
  const __m256i ones = _mm256_set1_epi16(1);
#endif
  for (int n = n0; n < n1; ++n) {
    const uint8_t* bp = B + (size_t)n * (K / 2);
    const float* sb = scales + (size_t)n * nblk;
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int b = 0; b < nblk; ++b) {
      __m256i s16[R];  // int16 pair sums (AVX2), or int32 sums of four (VNNI: low nibbles here, high in s_hi)
      for (int r = 0; r < R; ++r) s16[r] = _mm256_setzero_si256();
#if QVL_VNNI
      // two accumulators per row: one chain of dependent vpdpbusd per block was latency-bound at one row (~1.5x
      // slower than the AVX2 build's independent vpmaddubsw)
      __m256i s_hi[R];
      for (int r = 0; r < R; ++r) s_hi[r] = _mm256_setzero_si256();
#endif
      for (int c = 0; c < blk; c += 64) {
        const uint8_t* src = bp + (size_t)b * (blk / 2) + c / 2;
        _mm_prefetch((const char*)(src + kPrefetchBytes), _MM_HINT_T0);
        const __m256i v = _mm256_loadu_si256((const __m256i*)src);
        const __m256i lo = _mm256_and_si256(v, low);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
        for (int r = 0; r < R; ++r) {
          const int8_t* q = qa[r].q + (size_t)b * blk + c;
#if QVL_VNNI
          s16[r] = _mm256_dpbusd_epi32(s16[r], lo, _mm256_loadu_si256((const __m256i*)q));
          s_hi[r] = _mm256_dpbusd_epi32(s_hi[r], hi, _mm256_loadu_si256((const __m256i*)(q + 32)));
#else
          // |sum| of one pair <= 2 * 15 * 127 = 3810; blk <= 256 adds 4 pairs per int16 lane: <= 15240
          s16[r] = _mm256_add_epi16(s16[r], _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i*)q)));
          s16[r] = _mm256_add_epi16(s16[r], _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i*)(q + 32))));
#endif
        }
      }
      const float sbv = sb[b];
      for (int r = 0; r < R; ++r) {
#if QVL_VNNI
        __m256i s32 = _mm256_add_epi32(s16[r], s_hi[r]);
#else
        __m256i s32 = _mm256_madd_epi16(s16[r], ones);
#endif
        s32 = _mm256_add_epi32(s32, _mm256_setr_epi32(qa[r].zp_term[b], 0, 0, 0, 0, 0, 0, 0));
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32), _mm256_set1_ps(qa[r].scale[b] * sbv), acc[r]);
      }
    }
    const float bn = bias ? bias[n] : 0.0f;
    for (int r = 0; r < R; ++r) y[r][n] = hsum_ps(acc[r]) + bn;
  }
}

// The int8 counterpart of gemm4_rows: B rows of K bytes.
template <int R, int blk>
inline void gemm8_rows(const QuantRow* qa, int K, const uint8_t* B, const float* scales, const float* bias,
                       int n0, int n1, float* const* y) {
  const int nblk = K / blk;
#if !QVL_VNNI
  const __m256i flip = _mm256_set1_epi8((char)0x80);
  const __m256i ones = _mm256_set1_epi16(1);
#endif
  for (int n = n0; n < n1; ++n) {
    const uint8_t* bp = B + (size_t)n * K;
    const float* sb = scales + (size_t)n * nblk;
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int b = 0; b < nblk; ++b) {
      __m256i s32[R];
      for (int r = 0; r < R; ++r) s32[r] = _mm256_setzero_si256();
#if QVL_VNNI
      __m256i s_odd[R];  // the odd 32-byte chunks' sums: two dependency chains per row, as in gemm4_rows
      for (int r = 0; r < R; ++r) s_odd[r] = _mm256_setzero_si256();
#endif
      for (int c = 0; c < blk; c += 32) {
        const uint8_t* src = bp + (size_t)b * blk + c;
        _mm_prefetch((const char*)(src + 2 * kPrefetchBytes), _MM_HINT_T0);
#if QVL_VNNI
        // VNNI accumulates four u8 x s8 products in int32 without saturating, so the codes stay unsigned (0..255)
        // as in the int4 path and the zero point folds in once per block as -128 * sum(qa) (zp_term): one
        // instruction per row per 32 bytes instead of a sign and a multiply-add
        const __m256i v = _mm256_loadu_si256((const __m256i*)src);
        for (int r = 0; r < R; ++r) {
          const __m256i q = _mm256_loadu_si256((const __m256i*)(qa[r].q + (size_t)b * blk + c));
          if ((c / 32) % 2 == 0) s32[r] = _mm256_dpbusd_epi32(s32[r], v, q);
          else s_odd[r] = _mm256_dpbusd_epi32(s_odd[r], v, q);
        }
#else
        const __m256i w = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)src), flip);
        const __m256i aw = _mm256_abs_epi8(w);  // -128 -> 0x80, read as unsigned 128
        for (int r = 0; r < R; ++r) {
          const __m256i q = _mm256_loadu_si256((const __m256i*)(qa[r].q + (size_t)b * blk + c));
          const __m256i p = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(q, w));
          s32[r] = _mm256_add_epi32(s32[r], _mm256_madd_epi16(p, ones));
        }
#endif
      }
      const float sbv = sb[b];
      for (int r = 0; r < R; ++r) {
#if QVL_VNNI
        s32[r] = _mm256_add_epi32(_mm256_add_epi32(s32[r], s_odd[r]),
                                  _mm256_setr_epi32(qa[r].zp_term[b], 0, 0, 0, 0, 0, 0, 0));
#endif
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32[r]), _mm256_set1_ps(qa[r].scale[b] * sbv), acc[r]);
      }
    }
    const float bn = bias ? bias[n] : 0.0f;
    for (int r = 0; r < R; ++r) y[r][n] = hsum_ps(acc[r]) + bn;
  }
}

template <int bits, int blk>
inline void rows(const QuantRow* qa, int R, const Job& j, int n0, int n1, float* const* y) {
  if (R == 4) {
    if (bits == 4) gemm4_rows<4, blk>(qa, j.K, j.B, j.scales, nullptr, n0, n1, y);
    else gemm8_rows<4, blk>(qa, j.K, j.B, j.scales, nullptr, n0, n1, y);
  } else {
    if (bits == 4) gemm4_rows<1, blk>(qa, j.K, j.B, j.scales, nullptr, n0, n1, y);
    else gemm8_rows<1, blk>(qa, j.K, j.B, j.scales, nullptr, n0, n1, y);
  }
}

template <int bits, int blk>
inline void columns(const Job& j, int n0, int n1) {
  int m = 0;
  for (; m + 4 <= j.M; m += 4) {
    float* y[4] = {j.Y + (size_t)m * j.N, j.Y + (size_t)(m + 1) * j.N, j.Y + (size_t)(m + 2) * j.N,
                   j.Y + (size_t)(m + 3) * j.N};
    rows<bits, blk>(j.rows + m, 4, j, n0, n1, y);
  }
  for (; m < j.M; ++m) {
    float* y[1] = {j.Y + (size_t)m * j.N};
    rows<bits, blk>(j.rows + m, 1, j, n0, n1, y);
  }
}

// Columns [n0, n1) of the job's Y for every row of A, four rows per pass over B.
inline void run_columns(const Job& j, int n0, int n1) {
  if (j.bits == 4) {
    if (j.blk == 64) columns<4, 64>(j, n0, n1);
    else if (j.blk == 128) columns<4, 128>(j, n0, n1);
    else columns<4, 256>(j, n0, n1);
  } else {
    if (j.blk == 32) columns<8, 32>(j, n0, n1);
    else if (j.blk == 64) columns<8, 64>(j, n0, n1);
    else if (j.blk == 128) columns<8, 128>(j, n0, n1);
    else columns<8, 256>(j, n0, n1);
  }
}

}  // namespace QVL_ISA
}  // namespace qvl
