// ONNX Runtime custom-op library: `qvl.kernels::MatMulNBitsAvx2`, a drop-in for `com.microsoft::MatMulNBits`
// nodes with no zero points (symmetric: code - 8 / code - 128), no bias, accuracy_level=4, and bits 4 with
// block_size 64/128/256 or bits 8 with block_size 32/64/128/256.
// Inputs A float [..., K], B uint8 [N, K/blk, blk*bits/8], scales float [N * K/blk] (MatMulNBits' own tensors, so
// the runtime swaps the op type in the graph proto and the weight store stays as it is); output float [..., N].
//
// ORT loads this file with SessionOptions.register_custom_ops_library and calls RegisterCustomOps. The work is
// split over output columns with ORT's own intra-op pool (KernelContext_ParallelFor), so no second pool competes
// for the cores.
#include <stdint.h>

#include <vector>

#include "nbits_avx2.h"
#include "ort_abi.h"

namespace {

using namespace qvl;
using namespace qvl::ort;

const Api* g_api = nullptr;

struct Kernel {
  int64_t K = 0, N = 0, blk = 0, bits = 0;
};

struct Job {
  const QuantRow* rows;
  int M, K, blk, bits, N, chunk;
  const uint8_t* B;
  const float* scales;
  float* Y;
};

template <int bits, int blk>
void rows(const QuantRow* qa, int R, const Job& j, int n0, int n1, float* const* y) {
  if (R == 4) {
    if (bits == 4) gemm4_rows<4, blk>(qa, j.K, j.B, j.scales, nullptr, n0, n1, y);
    else gemm8_rows<4, blk>(qa, j.K, j.B, j.scales, nullptr, n0, n1, y);
  } else {
    if (bits == 4) gemm4_rows<1, blk>(qa, j.K, j.B, j.scales, nullptr, n0, n1, y);
    else gemm8_rows<1, blk>(qa, j.K, j.B, j.scales, nullptr, n0, n1, y);
  }
}

template <int bits, int blk>
void columns(const Job& j, int n0, int n1) {
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

// One task: output columns [t*chunk, (t+1)*chunk) for every row of A, four rows per pass over B.
void run_task(void* data, size_t t) {
  const Job& j = *static_cast<const Job*>(data);
  const int n0 = (int)t * j.chunk;
  const int n1 = n0 + j.chunk < j.N ? n0 + j.chunk : j.N;
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

struct Quantize {
  const float* A;
  QuantRow* rows;
  int K, blk;
  bool permuted;
};

void quantize_task(void* data, size_t m) {
  const Quantize& q = *static_cast<const Quantize*>(data);
  quantize_row(q.A + m * (size_t)q.K, q.K, q.blk, q.permuted, q.rows[m]);
}

constexpr int kFail = 1;  // OrtErrorCode ORT_FAIL

Status* fail(const char* msg) { return g_api->CreateStatus(kFail, msg); }

#define QVL_TRY(call)                  \
  do {                                 \
    if (Status* st_ = (call)) return st_; \
  } while (0)

Status* compute(void* kernel, KernelContext* ctx) {
  const Kernel& k = *static_cast<Kernel*>(kernel);
  const Value *a_val = nullptr, *b_val = nullptr, *s_val = nullptr;
  QVL_TRY(g_api->KernelContext_GetInput(ctx, 0, &a_val));
  QVL_TRY(g_api->KernelContext_GetInput(ctx, 1, &b_val));
  QVL_TRY(g_api->KernelContext_GetInput(ctx, 2, &s_val));
  TensorTypeAndShapeInfo* info = nullptr;
  QVL_TRY(g_api->GetTensorTypeAndShape(a_val, &info));
  size_t rank = 0;
  Status* st = g_api->GetDimensionsCount(info, &rank);
  std::vector<int64_t> dims(rank);
  if (st == nullptr) st = g_api->GetDimensions(info, dims.data(), rank);
  g_api->ReleaseTensorTypeAndShapeInfo(info);
  if (st) return st;
  if (rank == 0 || dims[rank - 1] != k.K) return fail("MatMulNBitsAvx2: A's last dimension is not K");
  int64_t M = 1;
  for (size_t i = 0; i + 1 < rank; ++i) M *= dims[i];
  dims[rank - 1] = k.N;
  Value* y_val = nullptr;
  QVL_TRY(g_api->KernelContext_GetOutput(ctx, 0, dims.data(), rank, &y_val));
  void *a = nullptr, *b = nullptr, *s = nullptr, *y = nullptr;
  QVL_TRY(g_api->GetTensorMutableData(const_cast<Value*>(a_val), &a));
  QVL_TRY(g_api->GetTensorMutableData(const_cast<Value*>(b_val), &b));
  QVL_TRY(g_api->GetTensorMutableData(const_cast<Value*>(s_val), &s));
  QVL_TRY(g_api->GetTensorMutableData(y_val, &y));
  if (M == 0) return nullptr;

  const int K = (int)k.K, blk = (int)k.blk, nblk = K / blk;
  std::vector<int8_t> q((size_t)M * K);
  std::vector<float> qs((size_t)M * nblk);
  std::vector<int32_t> zt((size_t)M * nblk);
  std::vector<QuantRow> rows((size_t)M);
  for (int64_t m = 0; m < M; ++m) rows[m] = {q.data() + m * K, qs.data() + m * nblk, zt.data() + m * nblk};
  Quantize qj{static_cast<const float*>(a), rows.data(), K, blk, k.bits == 4};
  if (M == 1)
    quantize_task(&qj, 0);
  else
    QVL_TRY(g_api->KernelContext_ParallelFor(ctx, quantize_task, (size_t)M, (size_t)M, &qj));

  // 64 columns per task at one row (decode: 32 tasks for N=2048, 2374 for the lm_head's 151936), fewer columns
  // when many rows make each task long anyway.
  const int chunk = M >= 16 ? 32 : 64;
  Job job{rows.data(), (int)M, K, blk, (int)k.bits, (int)k.N, chunk, static_cast<const uint8_t*>(b), static_cast<const float*>(s),
          static_cast<float*>(y)};
  const size_t tasks = ((size_t)k.N + chunk - 1) / chunk;
  return g_api->KernelContext_ParallelFor(ctx, run_task, tasks, 0, &job);
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
    return api->CreateStatus(kFail, "MatMulNBitsAvx2 takes bits 4 (block 64/128/256) or 8 (block 32..256) dividing K");
  *out = new Kernel(k);
  return nullptr;
}

const char* op_name(const CustomOp*) { return "MatMulNBitsAvx2"; }
const char* op_provider(const CustomOp*) { return nullptr; }  // the CPU provider
ElementType input_type(const CustomOp*, size_t i) { return i == 1 ? kUint8 : kFloat; }
size_t input_count(const CustomOp*) { return 3; }
ElementType output_type(const CustomOp*, size_t) { return kFloat; }
size_t output_count(const CustomOp*) { return 1; }
void destroy_kernel(void* k) { delete static_cast<Kernel*>(k); }
int required(const CustomOp*, size_t) { return 0; }
int default_memory(const CustomOp*, size_t) { return 0; }
int one(const CustomOp*) { return 1; }
int start_version(const CustomOp*) { return 1; }
int end_version(const CustomOp*) { return 2147483647; }

CustomOp make_op() {
  CustomOp op{};
  op.version = kApiVersion;
  op.GetName = op_name;
  op.GetExecutionProviderType = op_provider;
  op.GetInputType = input_type;
  op.GetInputTypeCount = input_count;
  op.GetOutputType = output_type;
  op.GetOutputTypeCount = output_count;
  op.KernelDestroy = destroy_kernel;
  op.GetInputCharacteristic = required;
  op.GetOutputCharacteristic = required;
  op.GetInputMemoryType = default_memory;
  op.GetVariadicInputMinArity = one;
  op.GetVariadicInputHomogeneity = one;
  op.GetVariadicOutputMinArity = one;
  op.GetVariadicOutputHomogeneity = one;
  op.CreateKernelV2 = create_kernel;
  op.KernelComputeV2 = compute;
  op.GetStartVersion = start_version;
  op.GetEndVersion = end_version;
  return op;
}

CustomOp g_op = make_op();

}  // namespace

extern "C" __attribute__((visibility("default"))) Status* RegisterCustomOps(SessionOptions* options,
                                                                           const ApiBase* base) {
  // KernelContext_ParallelFor is the newest call used here.
  g_api = base->GetApi(kApiVersion);
  if (g_api == nullptr) return nullptr;  // an ORT older than 1.17: nothing registered, the graph fails to load
  CustomOpDomain* domain = nullptr;
  if (Status* s = g_api->CreateCustomOpDomain("qvl.kernels", &domain)) return s;
  if (Status* s = g_api->CustomOpDomain_Add(domain, &g_op)) return s;
  return g_api->AddCustomOpDomain(options, domain);
}
