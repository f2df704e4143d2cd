// ONNX Runtime custom-op library, domain `qvl.kernels`:
// - `MatMulNBitsAvx2`, a drop-in for `com.microsoft::MatMulNBits` nodes with no zero points (symmetric: code - 8 /
//   code - 128), no bias, accuracy_level=4, and bits 4 with block_size 64/128/256 or bits 8 with block_size
//   32/64/128/256. Inputs A float [..., K], B uint8 [N, K/blk, blk*bits/8], scales float [N * K/blk]
//   (MatMulNBits' own tensors, so the runtime swaps the op type in the graph proto and the weight store stays as
//   it is); output float [..., N].
// - `MatMulNBitsSwiGluAvx2(A, B_gate, scales_gate, B_up, scales_up)`: silu(A x Wg^T) * (A x Wu^T), the decoder
//   MLP's gate and up projections and their activation in one node; A is quantized once for both.
// - `HeadRmsNormRotary` (norm_rotary_op.cpp).
// - `RowwiseGroupQueryAttention` (attention_op.cpp).
//
// ORT loads this file with SessionOptions.register_custom_ops_library and calls RegisterCustomOps. The work is
// split over output columns with ORT's own intra-op pool (KernelContext_ParallelFor), so no second pool competes
// for the cores.
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <vector>

#include "nbits_avx2.h"
#include "ort_op.h"

namespace qvl {
const ort::Api* g_api = nullptr;
}

namespace {

using namespace qvl;
using namespace qvl::ort;

struct Kernel {
  int64_t K = 0, N = 0, blk = 0, bits = 0;
  bool vnni = false;
};

// The VNNI build of the kernel where the CPU has AVX-512 VNNI (+VL), unless QVL_KERNEL_ISA=avx2 asks for the AVX2
// one (what the laptop runs, for comparisons on an AVX-512 host); read when a session creates the kernel.
bool use_vnni() {
  const char* isa = getenv("QVL_KERNEL_ISA");
  return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") && !(isa && strcmp(isa, "avx2") == 0);
}

void run_columns(const Job& j, int n0, int n1) {
  if (j.vnni) vnni_run_columns(j, n0, n1);
  else avx2::run_columns(j, n0, n1);
}

int task_columns(const Job& j, size_t t, int* n1) {
  const int n0 = (int)t * j.chunk;
  *n1 = n0 + j.chunk < j.N ? n0 + j.chunk : j.N;
  return n0;
}

// One task: output columns [t*chunk, (t+1)*chunk) for every row of A, four rows per pass over B.
void matmul_task(void* data, size_t t) {
  const Job& j = *static_cast<const Job*>(data);
  int n1;
  const int n0 = task_columns(j, t, &n1);
  run_columns(j, n0, n1);
}

struct SwiGluJob {
  Job gate, up;  // up.Y: a scratch [M, N]
};

// The same columns of gate and up, then gate's become silu(gate) * up while both are in cache.
void swiglu_task(void* data, size_t t) {
  const SwiGluJob& j = *static_cast<const SwiGluJob*>(data);
  int n1;
  const int n0 = task_columns(j.gate, t, &n1);
  run_columns(j.gate, n0, n1);
  run_columns(j.up, n0, n1);
  for (int m = 0; m < j.gate.M; ++m) {
    float* g = j.gate.Y + (size_t)m * j.gate.N;
    const float* u = j.up.Y + (size_t)m * j.up.N;
    for (int n = n0; n < n1; ++n) g[n] = g[n] / (1.0f + expf(-g[n])) * u[n];
  }
}

struct Quantize {
  const float* A;
  QuantRow* rows;
  int K, blk;
  bool permuted;
};

void quantize_task(void* data, size_t m) {
  const Quantize& q = *static_cast<const Quantize*>(data);
  avx2::quantize_row(q.A + m * (size_t)q.K, q.K, q.blk, q.permuted, q.rows[m]);
}

// A's rows quantized to int8 per block, as MatMulNBits at accuracy_level 4 does.
struct QuantizedA {
  std::vector<int8_t> q;
  std::vector<float> scale;
  std::vector<int32_t> zp_term;
  std::vector<QuantRow> rows;

  Status* quantize(KernelContext* ctx, const float* a, int64_t M, const Kernel& k) {
    const int K = (int)k.K, blk = (int)k.blk, nblk = K / blk;
    q.resize((size_t)M * K);
    scale.resize((size_t)M * nblk);
    zp_term.resize((size_t)M * nblk);
    rows.resize((size_t)M);
    for (int64_t m = 0; m < M; ++m) rows[m] = {q.data() + m * K, scale.data() + m * nblk, zp_term.data() + m * nblk};
    Quantize qj{a, rows.data(), K, blk, k.bits == 4};
    if (M == 1) {
      quantize_task(&qj, 0);
      return nullptr;
    }
    return g_api->KernelContext_ParallelFor(ctx, quantize_task, (size_t)M, (size_t)M, &qj);
  }
};

// 64 columns per task at one row (decode: 32 tasks for N=2048, 2374 for the lm_head's 151936), fewer columns
// when many rows make each task long anyway.
Job make_job(const Kernel& k, const QuantizedA& qa, int64_t M, const void* b, const void* s, float* y) {
  const int chunk = M >= 16 ? 32 : 64;
  return Job{qa.rows.data(), (int)M, (int)k.K, (int)k.blk, (int)k.bits, (int)k.N, chunk,
             static_cast<const uint8_t*>(b), static_cast<const float*>(s), y, k.vnni};
}

size_t tasks(const Job& j) { return ((size_t)j.N + j.chunk - 1) / j.chunk; }

// A [..., K] -> Y [..., N]; M = the product of A's leading dimensions.
Status* output_like_a(KernelContext* ctx, const Kernel& k, void** a, int64_t* M, void** y) {
  std::vector<int64_t> dims;
  QVL_TRY(input(ctx, 0, a, &dims));
  if (dims.empty() || dims.back() != k.K) return fail("qvl MatMulNBits: A's last dimension is not K");
  *M = elements(dims, dims.size() - 1);
  dims.back() = k.N;
  return output(ctx, 0, dims, y);
}

Status* matmul_compute(void* kernel, KernelContext* ctx) {
  const Kernel& k = *static_cast<Kernel*>(kernel);
  void *a = nullptr, *b = nullptr, *s = nullptr, *y = nullptr;
  int64_t M = 0;
  QVL_TRY(output_like_a(ctx, k, &a, &M, &y));
  QVL_TRY(input(ctx, 1, &b));
  QVL_TRY(input(ctx, 2, &s));
  if (M == 0) return nullptr;
  QuantizedA qa;
  QVL_TRY(qa.quantize(ctx, static_cast<const float*>(a), M, k));
  Job job = make_job(k, qa, M, b, s, static_cast<float*>(y));
  return g_api->KernelContext_ParallelFor(ctx, matmul_task, tasks(job), 0, &job);
}

Status* swiglu_compute(void* kernel, KernelContext* ctx) {
  const Kernel& k = *static_cast<Kernel*>(kernel);
  void *a = nullptr, *bg = nullptr, *sg = nullptr, *bu = nullptr, *su = nullptr, *y = nullptr;
  int64_t M = 0;
  QVL_TRY(output_like_a(ctx, k, &a, &M, &y));
  QVL_TRY(input(ctx, 1, &bg));
  QVL_TRY(input(ctx, 2, &sg));
  QVL_TRY(input(ctx, 3, &bu));
  QVL_TRY(input(ctx, 4, &su));
  if (M == 0) return nullptr;
  QuantizedA qa;
  QVL_TRY(qa.quantize(ctx, static_cast<const float*>(a), M, k));
  std::vector<float> up((size_t)M * k.N);
  SwiGluJob job{make_job(k, qa, M, bg, sg, static_cast<float*>(y)), make_job(k, qa, M, bu, su, up.data())};
  return g_api->KernelContext_ParallelFor(ctx, swiglu_task, tasks(job.gate), 0, &job);
}

Status* create_kernel(const CustomOp*, const Api* api, const KernelInfo* info, void** out) {
  Kernel k;
  QVL_TRY(api->KernelInfoGetAttribute_int64(info, "K", &k.K));
  QVL_TRY(api->KernelInfoGetAttribute_int64(info, "N", &k.N));
  QVL_TRY(api->KernelInfoGetAttribute_int64(info, "block_size", &k.blk));
  QVL_TRY(api->KernelInfoGetAttribute_int64(info, "bits", &k.bits));
  const bool blk_ok = (k.bits == 4 && (k.blk == 64 || k.blk == 128 || k.blk == 256)) ||
                      (k.bits == 8 && (k.blk == 32 || k.blk == 64 || k.blk == 128 || k.blk == 256));
  if (!blk_ok || k.K <= 0 || k.N <= 0 || k.K % k.blk != 0)
    return api->CreateStatus(kFail, "qvl MatMulNBits takes bits 4 (block 64/128/256) or 8 (block 32..256) dividing K");
  k.vnni = use_vnni();
  *out = new Kernel(k);
  return nullptr;
}

}  // namespace

extern "C" __attribute__((visibility("default"))) Status* RegisterCustomOps(SessionOptions* options,
                                                                           const ApiBase* base) {
  // KernelContext_ParallelFor is the newest call used here.
  g_api = base->GetApi(kApiVersion);
  if (g_api == nullptr) return nullptr;  // an ORT older than 1.17: nothing registered, the graph fails to load
  static const OpRecord* matmul = make_op("MatMulNBitsAvx2", {kFloat, kUint8, kFloat}, create_kernel,
                                          matmul_compute, destroy_kernel<Kernel>);
  static const OpRecord* swiglu = make_op("MatMulNBitsSwiGluAvx2", {kFloat, kUint8, kFloat, kUint8, kFloat},
                                          create_kernel, swiglu_compute, destroy_kernel<Kernel>);
  CustomOpDomain* domain = nullptr;
  QVL_TRY(g_api->CreateCustomOpDomain("qvl.kernels", &domain));
  for (const CustomOp* op : {&matmul->op, &swiglu->op, head_rms_norm_rotary_op(), rowwise_gqa_op()})
    QVL_TRY(g_api->CustomOpDomain_Add(domain, op));
  return g_api->AddCustomOpDomain(options, domain);
}
