// What every op of the library shares: the OrtApi pointer RegisterCustomOps fetched, status helpers, input
// access, and the custom-op record (all inputs and outputs required, CPU provider, V2 entry points).
#pragma once
#include <stdint.h>

#include <vector>

#include "ort_abi.h"

namespace qvl {

extern const ort::Api* g_api;  // set once by RegisterCustomOps (nbits_avx2_op.cpp)

constexpr int kFail = 1;  // OrtErrorCode ORT_FAIL

inline ort::Status* fail(const char* msg) { return g_api->CreateStatus(kFail, msg); }

#define QVL_TRY(call)                     \
  do {                                    \
    if (::qvl::ort::Status* st_ = (call)) return st_; \
  } while (0)

// Input `i`: its data pointer and, when `dims` is given, its shape.
inline ort::Status* input(ort::KernelContext* ctx, size_t i, void** data, std::vector<int64_t>* dims = nullptr) {
  const ort::Value* v = nullptr;
  QVL_TRY(g_api->KernelContext_GetInput(ctx, i, &v));
  if (dims) {
    ort::TensorTypeAndShapeInfo* info = nullptr;
    QVL_TRY(g_api->GetTensorTypeAndShape(v, &info));
    size_t rank = 0;
    ort::Status* st = g_api->GetDimensionsCount(info, &rank);
    dims->assign(rank, 0);
    if (st == nullptr) st = g_api->GetDimensions(info, dims->data(), rank);
    g_api->ReleaseTensorTypeAndShapeInfo(info);
    if (st) return st;
  }
  return g_api->GetTensorMutableData(const_cast<ort::Value*>(v), data);
}

inline ort::Status* output(ort::KernelContext* ctx, size_t i, const std::vector<int64_t>& dims, void** data) {
  ort::Value* v = nullptr;
  QVL_TRY(g_api->KernelContext_GetOutput(ctx, i, dims.data(), dims.size(), &v));
  return g_api->GetTensorMutableData(v, data);
}

inline int64_t elements(const std::vector<int64_t>& dims, size_t upto) {
  int64_t n = 1;
  for (size_t i = 0; i < upto && i < dims.size(); ++i) n *= dims[i];
  return n;
}

// A custom-op record: OrtCustomOp first (ORT sees only that), then what its callbacks read back.
struct OpRecord {
  ort::CustomOp op;
  const char* name;
  std::vector<ort::ElementType> inputs;
  size_t outputs;  // all float
};

template <class Kernel>
void destroy_kernel(void* k) {
  delete static_cast<Kernel*>(k);
}

inline OpRecord* make_op(const char* name, std::vector<ort::ElementType> inputs,
                         ort::Status* (*create)(const ort::CustomOp*, const ort::Api*, const ort::KernelInfo*, void**),
                         ort::Status* (*compute)(void*, ort::KernelContext*), void (*destroy)(void*),
                         size_t outputs = 1) {
  using ort::CustomOp;
  auto* r = new OpRecord{};  // lives as long as the process: ORT keeps the pointer
  r->name = name;
  r->inputs = std::move(inputs);
  r->outputs = outputs;
  CustomOp& op = r->op;
  op.version = ort::kApiVersion;
  op.GetName = [](const CustomOp* o) { return reinterpret_cast<const OpRecord*>(o)->name; };
  op.GetExecutionProviderType = [](const CustomOp*) -> const char* { return nullptr; };  // the CPU provider
  op.GetInputType = [](const CustomOp* o, size_t i) { return reinterpret_cast<const OpRecord*>(o)->inputs[i]; };
  op.GetInputTypeCount = [](const CustomOp* o) { return reinterpret_cast<const OpRecord*>(o)->inputs.size(); };
  op.GetOutputType = [](const CustomOp*, size_t) { return ort::kFloat; };
  op.GetOutputTypeCount = [](const CustomOp* o) { return reinterpret_cast<const OpRecord*>(o)->outputs; };
  op.KernelDestroy = destroy;
  op.GetInputCharacteristic = [](const CustomOp*, size_t) { return 0; };   // required
  op.GetOutputCharacteristic = [](const CustomOp*, size_t) { return 0; };  // required
  op.GetInputMemoryType = [](const CustomOp*, size_t) { return 0; };       // the provider's default memory
  op.GetVariadicInputMinArity = [](const CustomOp*) { return 1; };
  op.GetVariadicInputHomogeneity = [](const CustomOp*) { return 1; };
  op.GetVariadicOutputMinArity = [](const CustomOp*) { return 1; };
  op.GetVariadicOutputHomogeneity = [](const CustomOp*) { return 1; };
  op.CreateKernelV2 = create;
  op.KernelComputeV2 = compute;
  op.GetStartVersion = [](const CustomOp*) { return 1; };
  op.GetEndVersion = [](const CustomOp*) { return 2147483647; };
  return r;
}

const ort::CustomOp* head_rms_norm_rotary_op();  // norm_rotary_op.cpp
const ort::CustomOp* rowwise_gqa_op();           // attention_op.cpp

}  // namespace qvl
