// `qvl.kernels::HeadRmsNormRotary(X, W, position_ids, cos_cache, sin_cache)`, attributes num_heads, epsilon:
// Qwen3's per-head q/k RMSNorm followed by rotary embedding, the work of the five nodes ORT's optimized decoder
// runs for it (Reshape to heads, SimplifiedLayerNormalization, Reshape back, com.microsoft RotaryEmbedding with
// interleaved=0 over the whole head), in one pass over each head while it is in registers / L1.
//   X float [B, S, num_heads * D], W float [D], position_ids int64 [B, S], cos_cache / sin_cache float [P, D/2]
//   Y float [B, S, num_heads * D]
//   n = x / sqrt(mean(x^2) + epsilon) * W                 (per head: the SimplifiedLayerNormalization, float)
//   y[i] = n[i] cos[p, i] - n[i + D/2] sin[p, i]          i <  D/2, p = position_ids[b, s]
//   y[i] = n[i] cos[p, i - D/2] + n[i - D/2] sin[p, i - D/2]   i >= D/2
// The norm's sums and order follow ORT's float SimplifiedLayerNormalization (sequential float sum, divide by
// the root, then scale); the rotary is plain multiply-adds.
#include <math.h>
#include <stdint.h>

#include <atomic>
#include <vector>

#include "ort_op.h"

namespace {

using namespace qvl;
using namespace qvl::ort;

struct Kernel {
  int64_t num_heads = 0;
  float epsilon = 0.0f;
};

struct Job {
  const float *x, *w, *cos, *sin;
  const int64_t* pos;
  float* y;
  int64_t heads, D, P;
  float epsilon;
  std::atomic<int> bad_position;  // set by a task that met a position outside the caches
};

void token_task(void* data, size_t t) {
  Job& j = *static_cast<Job*>(data);
  const int64_t p = j.pos[t];
  if (p < 0 || p >= j.P) {
    j.bad_position.store(1, std::memory_order_relaxed);
    return;
  }
  const int64_t half = j.D / 2;
  const float* c = j.cos + p * half;
  const float* s = j.sin + p * half;
  float n[512];  // D <= 512, checked at compute
  for (int64_t h = 0; h < j.heads; ++h) {
    const float* x = j.x + ((size_t)t * j.heads + h) * j.D;
    float* y = j.y + ((size_t)t * j.heads + h) * j.D;
    float sq = 0.0f;
    for (int64_t i = 0; i < j.D; ++i) sq += x[i] * x[i];
    const float root = sqrtf(sq / (float)j.D + j.epsilon);
    for (int64_t i = 0; i < j.D; ++i) n[i] = x[i] / root * j.w[i];
    for (int64_t i = 0; i < half; ++i) {
      y[i] = n[i] * c[i] - n[i + half] * s[i];
      y[i + half] = n[i + half] * c[i] + n[i] * s[i];
    }
  }
}

Status* compute(void* kernel, KernelContext* ctx) {
  const Kernel& k = *static_cast<Kernel*>(kernel);
  std::vector<int64_t> xd, wd, pd, cd, sd;
  void *x = nullptr, *w = nullptr, *pos = nullptr, *cs = nullptr, *sn = nullptr, *y = nullptr;
  QVL_TRY(input(ctx, 0, &x, &xd));
  QVL_TRY(input(ctx, 1, &w, &wd));
  QVL_TRY(input(ctx, 2, &pos, &pd));
  QVL_TRY(input(ctx, 3, &cs, &cd));
  QVL_TRY(input(ctx, 4, &sn, &sd));
  if (xd.size() != 3 || wd.size() != 1) return fail("HeadRmsNormRotary: X must be [B, S, H*D] and W [D]");
  const int64_t D = wd[0];
  if (D <= 0 || D % 2 != 0 || D > 512 || xd[2] != k.num_heads * D)
    return fail("HeadRmsNormRotary: X's last dimension is not num_heads * D (D even, <= 512)");
  if (pd.size() != 2 || pd[0] != xd[0] || pd[1] != xd[1])
    return fail("HeadRmsNormRotary: position_ids must be [B, S] like X");
  if (cd.size() != 2 || cd[1] != D / 2 || sd != cd)
    return fail("HeadRmsNormRotary: cos_cache and sin_cache must both be [P, D/2]");
  QVL_TRY(output(ctx, 0, xd, &y));
  const int64_t tokens = xd[0] * xd[1];
  Job job{static_cast<const float*>(x), static_cast<const float*>(w), static_cast<const float*>(cs),
          static_cast<const float*>(sn), static_cast<const int64_t*>(pos), static_cast<float*>(y),
          k.num_heads, D, cd[0], k.epsilon, 0};
  if (tokens < 16) {  // a decode step: a few thousand floats, less work than handing it to the pool
    for (int64_t t = 0; t < tokens; ++t) token_task(&job, (size_t)t);
  } else {
    QVL_TRY(g_api->KernelContext_ParallelFor(ctx, token_task, (size_t)tokens, 0, &job));
  }
  return job.bad_position.load() ? fail("HeadRmsNormRotary: a position id is outside the cos/sin caches") : nullptr;
}

Status* create_kernel(const CustomOp*, const Api* api, const KernelInfo* info, void** out) {
  Kernel k;
  QVL_TRY(api->KernelInfoGetAttribute_int64(info, "num_heads", &k.num_heads));
  QVL_TRY(api->KernelInfoGetAttribute_float(info, "epsilon", &k.epsilon));
  if (k.num_heads <= 0) return api->CreateStatus(kFail, "HeadRmsNormRotary: num_heads must be positive");
  *out = new Kernel(k);
  return nullptr;
}

}  // namespace

namespace qvl {

const ort::CustomOp* head_rms_norm_rotary_op() {
  static const OpRecord* op = make_op("HeadRmsNormRotary", {kFloat, kFloat, kInt64, kFloat, kFloat}, create_kernel,
                                      compute, destroy_kernel<Kernel>);
  return &op->op;
}

}  // namespace qvl
