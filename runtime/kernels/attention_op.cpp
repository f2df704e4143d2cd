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
// bit-identical outputs for the same position.
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
#include <atomic>
#include <vector>

#include "ort_op.h"

namespace {

using namespace qvl;
using namespace qvl::ort;

constexpr int64_t kRowsPerTask = 16;

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

// q . k over D (a multiple of 8): four accumulators in a fixed order.
inline float dot(const float* q, const float* k, int64_t D) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 32 <= D; i += 32) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_loadu_ps(k + i), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 8), _mm256_loadu_ps(k + i + 8), a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 16), _mm256_loadu_ps(k + i + 16), a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 24), _mm256_loadu_ps(k + i + 24), a3);
  }
  for (; i < D; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_loadu_ps(k + i), a0);
  return hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
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

// One task: kv head `kh` of row b, query rows [s0, s1), every query head of the group.
void attention_task(void* data, size_t t) {
  const Job& j = *static_cast<const Job*>(data);
  const int64_t rb = (int64_t)t % j.row_blocks, bh = (int64_t)t / j.row_blocks;
  const int64_t b = bh / j.Hkv, kh = bh % j.Hkv, group = j.Hq / j.Hkv, D = j.D;
  const int64_t total = (int64_t)j.seqlens[b] + 1;
  const int64_t start = j.first_prompt ? 0 : total - j.S;
  const float* K = j.K + (b * j.Hkv + kh) * j.T * D;
  const float* V = j.V + (b * j.Hkv + kh) * j.T * D;
  std::vector<float> p((size_t)j.T + 8);
  const int64_t s1 = std::min(j.S, (rb + 1) * kRowsPerTask);
  for (int64_t s = rb * kRowsPerTask; s < s1; ++s) {
    // causal length of this query row; a first prompt's rows past a row's own length (right padding) attend to
    // that length (ORT's kernel reads past it: those rows are padding either way)
    const int64_t L = std::min(start + s + 1, total);
    for (int64_t g = 0; g < group; ++g) {
      const int64_t h = kh * group + g;
      const float* q = j.q + ((b * j.S + s) * j.Hq + h) * D;
      float* y = j.out + ((b * j.S + s) * j.Hq + h) * D;
      if (L <= 0) {  // not reached: write_cache refuses a row with no positions
        memset(y, 0, sizeof(float) * D);
        continue;
      }
      float mx = -INFINITY;
      for (int64_t k = 0; k < L; ++k) {
        p[k] = dot(q, K + k * D, D) * j.scale;
        mx = std::max(mx, p[k]);
      }
      // exp in blocks of 8 with fixed partial sums; the tail scalar (same polynomial)
      const __m256 vmx = _mm256_set1_ps(mx);
      __m256 vs = _mm256_setzero_ps();
      int64_t k = 0;
      for (; k + 8 <= L; k += 8) {
        const __m256 e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(&p[k]), vmx));
        _mm256_storeu_ps(&p[k], e);
        vs = _mm256_add_ps(vs, e);
      }
      float sum = hsum(vs);
      for (; k < L; ++k) {
        p[k] = exp_scalar(p[k] - mx);
        sum += p[k];
      }
      const float inv = 1.0f / sum;
      for (int64_t d0 = 0; d0 < D; d0 += 64) {  // 8 accumulators of 8 lanes per pass over V
        const int64_t w = std::min<int64_t>(64, D - d0) / 8;
        __m256 acc[8];
        for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
        for (int64_t k2 = 0; k2 < L; ++k2) {
          const __m256 pk = _mm256_set1_ps(p[k2]);
          const float* v = V + k2 * D + d0;
          for (int i = 0; i < w; ++i) acc[i] = _mm256_fmadd_ps(pk, _mm256_loadu_ps(v + 8 * i), acc[i]);
        }
        for (int i = 0; i < w; ++i) _mm256_storeu_ps(y + d0 + 8 * i, _mm256_mul_ps(acc[i], _mm256_set1_ps(inv)));
      }
    }
  }
}

// K/V of the call's new positions into present (and past into present when they are not one buffer).
Status* write_cache(const float* src, const float* past, float* present, const int32_t* seqlens, int64_t B, int64_t S,
                    int64_t Hkv, int64_t D, int64_t P, int64_t T, bool first_prompt) {
  const bool shared = past == present;
  if (!shared) memset(present, 0, sizeof(float) * B * Hkv * T * D);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t total = (int64_t)seqlens[b] + 1;
    const int64_t start = first_prompt ? 0 : total - S;
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
