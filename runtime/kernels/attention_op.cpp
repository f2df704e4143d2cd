// `qvl.kernels::RowwiseGroupQueryAttention(query, key, value, past_key, past_value, seqlens_k,
// total_sequence_length)`, attributes num_heads, kv_num_heads, scale: com.microsoft GroupQueryAttention on the CPU
// for the decoder's configuration (separate q/k/v, no rotary inside, no softcap, no local window, no smooth
// softmax), with the same inputs, outputs and cache rules, computed one query row at a time.
//
// Why: ORT's kernel computes Q x K^T of a call with one GEMM, so a position's attention output depends (in the
// last bits) on how many positions the call holds: a token decoded alone, prefilled with its prompt or verified
// with drafts gets different rounding. After the int8 activation quantization of the next linears those bits can
// flip a rounding step, and through 28 layers of random weights that grows to ~0.2 on the logits (measured on the
// 2B random checkpoint). Here every (row, head) is computed by one task with one fixed loop order whatever the
// call's shape, so prefill, decode steps, prefix-cache follow-ups, speculative verify steps and batched rows give
// bit-identical outputs for the same position. Queries are computed four at a time against each K/V row (the
// tiles change what is read together, never a query's own order of operations).
//
//   query [B, S, Hq*D], key / value [B, S, Hkv*D], past_key / past_value [B, Hkv, P, D], seqlens_k int32 [B]
//   (total length - 1 per row), total_sequence_length int32 [1]
//   output [B, S, Hq*D], present_key / present_value [B, Hkv, max(P, total), D]
// As ORT: the first prompt (S == total_sequence_length) writes K/V from position 0; otherwise row b's S new
// positions start at seqlens_k[b] + 1 - S. When present and past are one buffer (the runtime's `shared` cache)
// the new K/V are written in place, else past is copied first and the rest of present is zero. Query row s of
// row b attends causally to positions [0, start + s] (at most the row's total length).
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <vector>

#include "ort_op.h"

namespace {

using namespace qvl;
using namespace qvl::ort;

constexpr int64_t kRowsPerTask = 16;
constexpr int64_t kPrefetchKeys = 16;  // how far ahead K/V rows are prefetched (past the end: a harmless hint)

struct Kernel {
  int64_t heads = 0, kv_heads = 0;
  float scale = 0.0f;
};

// exp(x) for x <= 0 (scores minus their maximum), Cephes' polynomial: ~1 ulp, the same value for the same input
// wherever it runs.
inline __m256 exp_ps(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
  const __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

inline float exp_scalar(float x) {
  alignas(32) float v[8] = {x};
  _mm256_store_ps(v, exp_ps(_mm256_load_ps(v)));
  return v[0];
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Lane c of the result = the sum of v[c]'s eight lanes, ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)).
inline __m256 reduce8(const __m256* v) {
  const __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

struct Job {
  const float* q;
  const float* K;  // present key [B, Hkv, T, D]
  const float* V;
  const int32_t* seqlens;
  float* out;
  int64_t B, S, Hq, Hkv, D, T;
  int64_t row_blocks;  // ceil(S / kRowsPerTask)
  bool first_prompt;
  float scale;
};

// Row b's length after the call (seqlens_k + 1) and the position of its first new one (ORT's rule: a first prompt
// writes from 0, otherwise the call's S positions end the row).
inline int64_t row_total(const int32_t* seqlens, int64_t b) { return (int64_t)seqlens[b] + 1; }
inline int64_t row_start(int64_t total, int64_t S, bool first_prompt) { return first_prompt ? 0 : total - S; }

// A query vector of a task: its q, its output, its causal length and its scores.
struct Query {
  const float* q;
  float* y;
  int64_t L;
  float* p;
};

// Scores of QT queries x KT keys at a time (QT * KT = 8 dot products, one accumulator each, over D in order, then
// reduce8): every (query, key) score is computed the same way whatever tile it falls in, and a query's keys past
// its own length are computed but not used. Keys [0, maxL).
template <int QT, int KT>
inline void scores(const Query* qs, const float* K, int64_t D, int64_t maxL, float scale) {
  for (int64_t k0 = 0; k0 < maxL; k0 += KT) {
    const float* kr[KT];
    for (int t = 0; t < KT; ++t) kr[t] = K + std::min<int64_t>(k0 + t, maxL - 1) * D;
    __m256 acc[8];
    for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) {
      __m256 kv[KT];
      for (int t = 0; t < KT; ++t) {
        // the K rows 16 keys on: a long context's K is read once per query tile, from DRAM or L3
        if (d % 16 == 0) _mm_prefetch((const char*)(kr[t] + kPrefetchKeys * D + d), _MM_HINT_T0);
        kv[t] = _mm256_loadu_ps(kr[t] + d);
      }
      for (int i = 0; i < QT; ++i) {
        const __m256 qv = _mm256_loadu_ps(qs[i].q + d);
        for (int t = 0; t < KT; ++t) acc[i * KT + t] = _mm256_fmadd_ps(qv, kv[t], acc[i * KT + t]);
      }
    }
    alignas(32) float out[8];
    _mm256_store_ps(out, _mm256_mul_ps(reduce8(acc), _mm256_set1_ps(scale)));
    for (int i = 0; i < QT; ++i)
      for (int t = 0; t < KT && k0 + t < maxL; ++t) qs[i].p[k0 + t] = out[i * KT + t];
  }
}

// p[0, L) -> softmax numerators in place; the reciprocal of their sum. exp in blocks of 8 with fixed partial sums,
// the tail scalar (same polynomial).
inline float softmax(float* p, int64_t L) {
  float mx = -INFINITY;
  for (int64_t k = 0; k < L; ++k) mx = std::max(mx, p[k]);
  const __m256 vmx = _mm256_set1_ps(mx);
  __m256 vs = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= L; k += 8) {
    const __m256 e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(p + k), vmx));
    _mm256_storeu_ps(p + k, e);
    vs = _mm256_add_ps(vs, e);
  }
  float sum = hsum(vs);
  for (; k < L; ++k) {
    p[k] = exp_scalar(p[k] - mx);
    sum += p[k];
  }
  return 1.0f / sum;
}

// y = inv * sum over keys k < L, in order, of p[k] V[k] for QT queries, each V row read once for all of them:
// 64 keys at a time (their V rows stay in L1/L2 while 16 output lanes at a time run over them; the sums carry
// over between blocks in `acc`), so per query and lane the same multiply-adds run in the same order whatever the
// tile and the context length.
constexpr int64_t kKeysPerBlock = 64;

template <int QT>
inline void weighted_values(const Query* qs, const float* inv, const float* V, int64_t D, int64_t maxL, float* acc) {
  for (int i = 0; i < QT; ++i) memset(acc + i * D, 0, sizeof(float) * D);
  for (int64_t k0 = 0; k0 < maxL; k0 += kKeysPerBlock) {
    const int64_t k1 = std::min(maxL, k0 + kKeysPerBlock);
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
      __m256 a[QT][2];
      for (int i = 0; i < QT; ++i) {
        a[i][0] = _mm256_loadu_ps(acc + i * D + d0);
        a[i][1] = _mm256_loadu_ps(acc + i * D + d0 + 8);
      }
      for (int64_t k = k0; k < k1; ++k) {
        _mm_prefetch((const char*)(V + (k + kPrefetchKeys) * D + d0), _MM_HINT_T0);
        const __m256 v0 = _mm256_loadu_ps(V + k * D + d0), v1 = _mm256_loadu_ps(V + k * D + d0 + 8);
        for (int i = 0; i < QT; ++i) {
          if (k >= qs[i].L) continue;
          const __m256 pk = _mm256_set1_ps(qs[i].p[k]);
          a[i][0] = _mm256_fmadd_ps(pk, v0, a[i][0]);
          a[i][1] = _mm256_fmadd_ps(pk, v1, a[i][1]);
        }
      }
      for (int i = 0; i < QT; ++i) {
        _mm256_storeu_ps(acc + i * D + d0, a[i][0]);
        _mm256_storeu_ps(acc + i * D + d0 + 8, a[i][1]);
      }
    }
  }
  for (int i = 0; i < QT; ++i)
    for (int64_t d = 0; d < D; d += 8)
      _mm256_storeu_ps(qs[i].y + d, _mm256_mul_ps(_mm256_loadu_ps(acc + i * D + d), _mm256_set1_ps(inv[i])));
}

// The same sums for one or two queries (decode): 64 output lanes at a time per query, one broadcast of p[k] per
// 64 lanes instead of per 16, the 64-key blocks as above. Per query and lane the same multiply-adds in the same
// order as weighted_values (only what is read together differs), so the bits are the same.
inline void weighted_values_few(const Query* qs, int QT, const float* inv, const float* V, int64_t D, float* acc) {
  for (int i = 0; i < QT; ++i) memset(acc + i * D, 0, sizeof(float) * D);
  int64_t maxL = 0;
  for (int i = 0; i < QT; ++i) maxL = std::max(maxL, qs[i].L);
  for (int64_t k0 = 0; k0 < maxL; k0 += kKeysPerBlock) {
    for (int i = 0; i < QT; ++i) {
      const int64_t k1 = std::min(qs[i].L, k0 + kKeysPerBlock);
      for (int64_t d0 = 0; d0 < D; d0 += 64) {
        const int w = (int)(std::min<int64_t>(64, D - d0) / 8);
        __m256 a[8];
        for (int c = 0; c < w; ++c) a[c] = _mm256_loadu_ps(acc + i * D + d0 + 8 * c);
        for (int64_t k = k0; k < k1; ++k) {
          const __m256 pk = _mm256_set1_ps(qs[i].p[k]);
          const float* v = V + k * D + d0;
          for (int c = 0; c < w; c += 2) _mm_prefetch((const char*)(v + kPrefetchKeys * D + 8 * c), _MM_HINT_T0);
          for (int c = 0; c < w; ++c) a[c] = _mm256_fmadd_ps(pk, _mm256_loadu_ps(v + 8 * c), a[c]);
        }
        for (int c = 0; c < w; ++c) _mm256_storeu_ps(acc + i * D + d0 + 8 * c, a[c]);
      }
    }
  }
  for (int i = 0; i < QT; ++i)
    for (int64_t d = 0; d < D; d += 8)
      _mm256_storeu_ps(qs[i].y + d, _mm256_mul_ps(_mm256_loadu_ps(acc + i * D + d), _mm256_set1_ps(inv[i])));
}

// QT queries (all of them used: the task cuts its queries into fours, then a two and a one).
template <int QT, int KT>
inline void query_tile(const Query* qs, const float* K, const float* V, int64_t D, float scale, float* acc) {
  int64_t maxL = 0;
  for (int i = 0; i < QT; ++i) maxL = std::max(maxL, qs[i].L);
  scores<QT, KT>(qs, K, D, maxL, scale);
  float inv[QT];
  for (int i = 0; i < QT; ++i) inv[i] = softmax(qs[i].p, qs[i].L);
  if (QT == 4) weighted_values<QT>(qs, inv, V, D, maxL, acc);
  else weighted_values_few(qs, QT, inv, V, D, acc);
}

// One task: kv head `kh` of row b, query rows [s0, s1), every query head of the group; four queries at a time
// (two rows x two heads in Qwen3's 16/8 heads), so each K and V row read serves four of them.
void attention_task(void* data, size_t t) {
  const Job& j = *static_cast<const Job*>(data);
  const int64_t rb = (int64_t)t % j.row_blocks, bh = (int64_t)t / j.row_blocks;
  const int64_t b = bh / j.Hkv, kh = bh % j.Hkv, group = j.Hq / j.Hkv, D = j.D;
  const int64_t total = row_total(j.seqlens, b), start = row_start(total, j.S, j.first_prompt);
  const float* K = j.K + (b * j.Hkv + kh) * j.T * D;
  const float* V = j.V + (b * j.Hkv + kh) * j.T * D;
  const int64_t s0 = rb * kRowsPerTask, s1 = std::min(j.S, (rb + 1) * kRowsPerTask);
  // per pool thread, kept between calls (a decode step runs 8 tasks per layer: no allocation in them)
  static thread_local std::vector<Query> qs;
  static thread_local std::vector<float> scratch, acc;
  qs.clear();
  const size_t need = (size_t)(s1 - s0) * group * ((size_t)j.T + 8);
  if (scratch.size() < need) scratch.resize(need);
  if (acc.size() < (size_t)4 * D) acc.resize((size_t)4 * D);
  for (int64_t s = s0; s < s1; ++s) {
    // causal length of this query row; a first prompt's rows past a row's own length (right padding) attend to
    // that length (ORT's kernel reads past it: those rows are padding either way)
    const int64_t L = std::min(start + s + 1, total);
    for (int64_t g = 0; g < group; ++g) {
      // L >= 1: write_cache, which runs first, refuses a row with no positions
      const size_t at = (size_t)((b * j.S + s) * j.Hq + kh * group + g) * D;
      qs.push_back({j.q + at, j.out + at, L, scratch.data() + qs.size() * ((size_t)j.T + 8)});
    }
  }
  const int n = (int)qs.size();
  int i = 0;
  for (; i + 4 <= n; i += 4) query_tile<4, 2>(qs.data() + i, K, V, D, j.scale, acc.data());
  if (n - i >= 2) query_tile<2, 4>(qs.data() + i, K, V, D, j.scale, acc.data()), i += 2;
  if (n - i == 1) query_tile<1, 8>(qs.data() + i, K, V, D, j.scale, acc.data());
}

// K/V of the call's new positions into present (and past into present when they are not one buffer).
Status* write_cache(const float* src, const float* past, float* present, const int32_t* seqlens, int64_t B, int64_t S,
                    int64_t Hkv, int64_t D, int64_t P, int64_t T, bool first_prompt) {
  const bool shared = past == present;
  if (!shared) memset(present, 0, sizeof(float) * B * Hkv * T * D);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t total = row_total(seqlens, b), start = row_start(total, S, first_prompt);
    if (total < 1 || start < 0 || start + S > T || (!shared && start > P))
      return fail("RowwiseGroupQueryAttention: seqlens_k does not fit the call's positions and the cache");
    for (int64_t h = 0; h < Hkv; ++h) {
      float* dst = present + (b * Hkv + h) * T * D;
      if (!shared && start > 0) memcpy(dst, past + (b * Hkv + h) * P * D, sizeof(float) * start * D);
      for (int64_t s = 0; s < S; ++s)
        memcpy(dst + (start + s) * D, src + ((b * S + s) * Hkv + h) * D, sizeof(float) * D);
    }
  }
  return nullptr;
}

Status* compute(void* kernel, KernelContext* ctx) {
  const Kernel& k = *static_cast<Kernel*>(kernel);
  std::vector<int64_t> qd, kd, vd, pkd, pvd, sld, td;
  void *q = nullptr, *kk = nullptr, *v = nullptr, *pk = nullptr, *pv = nullptr, *sl = nullptr, *tot = nullptr;
  QVL_TRY(input(ctx, 0, &q, &qd));
  QVL_TRY(input(ctx, 1, &kk, &kd));
  QVL_TRY(input(ctx, 2, &v, &vd));
  QVL_TRY(input(ctx, 3, &pk, &pkd));
  QVL_TRY(input(ctx, 4, &pv, &pvd));
  QVL_TRY(input(ctx, 5, &sl, &sld));
  QVL_TRY(input(ctx, 6, &tot, &td));
  if (qd.size() != 3 || qd[2] % k.heads != 0) return fail("RowwiseGroupQueryAttention: query must be [B, S, Hq*D]");
  const int64_t B = qd[0], S = qd[1], D = qd[2] / k.heads;
  if (D % 8 != 0) return fail("RowwiseGroupQueryAttention: head size must be a multiple of 8");
  const std::vector<int64_t> kv_in{B, S, k.kv_heads * D};
  if (kd != kv_in || vd != kv_in) return fail("RowwiseGroupQueryAttention: key and value must be [B, S, Hkv*D]");
  if (pkd.size() != 4 || pkd[0] != B || pkd[1] != k.kv_heads || pkd[3] != D || pvd != pkd)
    return fail("RowwiseGroupQueryAttention: past_key and past_value must both be [B, Hkv, P, D]");
  if (sld.size() != 1 || sld[0] != B || elements(td, td.size()) != 1)
    return fail("RowwiseGroupQueryAttention: seqlens_k must be [B] and total_sequence_length one value");
  const int32_t* seqlens = static_cast<const int32_t*>(sl);
  const int64_t total = *static_cast<const int32_t*>(tot), P = pkd[2], T = std::max(P, total);
  const bool first_prompt = S == total;
  if (!first_prompt && S != 1 && B != 1)
    return fail("RowwiseGroupQueryAttention: more than one new position per row needs batch 1 (as ORT's kernel)");
  void *out = nullptr, *ok = nullptr, *ov = nullptr;
  QVL_TRY(output(ctx, 0, qd, &out));
  const std::vector<int64_t> present{B, k.kv_heads, T, D};
  QVL_TRY(output(ctx, 1, present, &ok));
  QVL_TRY(output(ctx, 2, present, &ov));
  if ((pk == ok) != (pv == ov)) return fail("RowwiseGroupQueryAttention: key and value caches must both be shared or not");
  QVL_TRY(write_cache(static_cast<const float*>(kk), static_cast<const float*>(pk), static_cast<float*>(ok), seqlens,
                      B, S, k.kv_heads, D, P, T, first_prompt));
  QVL_TRY(write_cache(static_cast<const float*>(v), static_cast<const float*>(pv), static_cast<float*>(ov), seqlens,
                      B, S, k.kv_heads, D, P, T, first_prompt));
  const int64_t blocks = (S + kRowsPerTask - 1) / kRowsPerTask;
  Job job{static_cast<const float*>(q), static_cast<const float*>(ok), static_cast<const float*>(ov), seqlens,
          static_cast<float*>(out), B, S, k.heads, k.kv_heads, D, T, blocks, first_prompt,
          k.scale != 0.0f ? k.scale : 1.0f / sqrtf((float)D)};
  const size_t tasks = (size_t)(B * k.kv_heads * blocks);
  return g_api->KernelContext_ParallelFor(ctx, attention_task, tasks, 0, &job);
}

Status* create_kernel(const CustomOp*, const Api* api, const KernelInfo* info, void** out) {
  Kernel k;
  QVL_TRY(api->KernelInfoGetAttribute_int64(info, "num_heads", &k.heads));
  QVL_TRY(api->KernelInfoGetAttribute_int64(info, "kv_num_heads", &k.kv_heads));
  QVL_TRY(api->KernelInfoGetAttribute_float(info, "scale", &k.scale));  // 0: 1/sqrt(D), as ORT (fuse.py writes it)
  if (k.heads <= 0 || k.kv_heads <= 0 || k.heads % k.kv_heads != 0)
    return api->CreateStatus(kFail, "RowwiseGroupQueryAttention: num_heads must be a positive multiple of kv_num_heads");
  *out = new Kernel(k);
  return nullptr;
}

}  // namespace

namespace qvl {

const ort::CustomOp* rowwise_gqa_op() {
  static const OpRecord* op =
      make_op("RowwiseGroupQueryAttention", {kFloat, kFloat, kFloat, kFloat, kFloat, kInt32, kInt32}, create_kernel,
              compute, destroy_kernel<Kernel>, 3);
  return &op->op;
}

}  // namespace qvl
