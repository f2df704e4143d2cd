// The slice of ONNX Runtime's C ABI this library calls, declared here because the onnxruntime Python wheel ships
// no C headers. OrtApi is a table of function pointers whose order ORT keeps stable across releases (it only
// appends); the slots used below carry their table index, checked by static_assert, and exist since ABI version
// 17 (ORT 1.17), the version RegisterCustomOps asks GetApi for. The custom-op record is filled to interface
// version 17: its V2 entry points return a status, so a bad call fails the Run instead of leaving stale output.
#pragma once
#include <stddef.h>
#include <stdint.h>

namespace qvl {
namespace ort {

struct Status;
struct SessionOptions;
struct CustomOpDomain;
struct KernelInfo;
struct KernelContext;
struct Value;
struct TensorTypeAndShapeInfo;
struct CustomOp;

enum ElementType : int { kFloat = 1, kUint8 = 2, kInt32 = 6, kInt64 = 7 };  // ONNXTensorElementDataType
constexpr uint32_t kApiVersion = 17;

#define QVL_ORT_SLOTS(from, to) void* slots_##from##_##to[(to) - (from) + 1]

struct Api {
  Status* (*CreateStatus)(int code, const char* msg);  // 0
  QVL_ORT_SLOTS(1, 25);
  Status* (*CreateCustomOpDomain)(const char* domain, CustomOpDomain** out);          // 26
  Status* (*CustomOpDomain_Add)(CustomOpDomain* domain, const CustomOp* op);          // 27
  Status* (*AddCustomOpDomain)(SessionOptions* options, CustomOpDomain* domain);      // 28
  QVL_ORT_SLOTS(29, 50);
  Status* (*GetTensorMutableData)(Value* value, void** out);                          // 51
  QVL_ORT_SLOTS(52, 60);
  Status* (*GetDimensionsCount)(const TensorTypeAndShapeInfo* info, size_t* out);     // 61
  Status* (*GetDimensions)(const TensorTypeAndShapeInfo* info, int64_t* dims, size_t n);  // 62
  QVL_ORT_SLOTS(63, 64);
  Status* (*GetTensorTypeAndShape)(const Value* value, TensorTypeAndShapeInfo** out);  // 65
  QVL_ORT_SLOTS(66, 84);
  Status* (*KernelInfoGetAttribute_float)(const KernelInfo* info, const char* name, float* out);  // 85
  Status* (*KernelInfoGetAttribute_int64)(const KernelInfo* info, const char* name, int64_t* out);  // 86
  QVL_ORT_SLOTS(87, 89);
  Status* (*KernelContext_GetInput)(const KernelContext* ctx, size_t index, const Value** out);  // 90
  Status* (*KernelContext_GetOutput)(KernelContext* ctx, size_t index, const int64_t* dims, size_t n,
                                     Value** out);                                     // 91
  QVL_ORT_SLOTS(92, 98);
  void (*ReleaseTensorTypeAndShapeInfo)(TensorTypeAndShapeInfo* info);                 // 99
  QVL_ORT_SLOTS(100, 273);
  Status* (*KernelContext_ParallelFor)(const KernelContext* ctx, void (*fn)(void*, size_t), size_t total,
                                       size_t num_batch, void* data);                  // 274
};

#undef QVL_ORT_SLOTS

#define QVL_ORT_SLOT(name, index) static_assert(offsetof(Api, name) == (index) * sizeof(void*), #name)
QVL_ORT_SLOT(CreateStatus, 0);
QVL_ORT_SLOT(CreateCustomOpDomain, 26);
QVL_ORT_SLOT(CustomOpDomain_Add, 27);
QVL_ORT_SLOT(AddCustomOpDomain, 28);
QVL_ORT_SLOT(GetTensorMutableData, 51);
QVL_ORT_SLOT(GetDimensionsCount, 61);
QVL_ORT_SLOT(GetDimensions, 62);
QVL_ORT_SLOT(GetTensorTypeAndShape, 65);
QVL_ORT_SLOT(KernelInfoGetAttribute_float, 85);
QVL_ORT_SLOT(KernelInfoGetAttribute_int64, 86);
QVL_ORT_SLOT(KernelContext_GetInput, 90);
QVL_ORT_SLOT(KernelContext_GetOutput, 91);
QVL_ORT_SLOT(ReleaseTensorTypeAndShapeInfo, 99);
QVL_ORT_SLOT(KernelContext_ParallelFor, 274);
#undef QVL_ORT_SLOT

struct ApiBase {
  const Api* (*GetApi)(uint32_t version);
  const char* (*GetVersionString)();
};

// OrtCustomOp as of interface version 17 (later fields: nullptr, read by newer ORT only when non-null).
struct CustomOp {
  uint32_t version;
  void* (*CreateKernel)(const CustomOp* op, const Api* api, const KernelInfo* info);
  const char* (*GetName)(const CustomOp* op);
  const char* (*GetExecutionProviderType)(const CustomOp* op);
  ElementType (*GetInputType)(const CustomOp* op, size_t index);
  size_t (*GetInputTypeCount)(const CustomOp* op);
  ElementType (*GetOutputType)(const CustomOp* op, size_t index);
  size_t (*GetOutputTypeCount)(const CustomOp* op);
  void (*KernelCompute)(void* kernel, KernelContext* ctx);
  void (*KernelDestroy)(void* kernel);
  int (*GetInputCharacteristic)(const CustomOp* op, size_t index);   // 0: required
  int (*GetOutputCharacteristic)(const CustomOp* op, size_t index);  // 0: required
  int (*GetInputMemoryType)(const CustomOp* op, size_t index);       // 0: the provider's default memory
  int (*GetVariadicInputMinArity)(const CustomOp* op);
  int (*GetVariadicInputHomogeneity)(const CustomOp* op);
  int (*GetVariadicOutputMinArity)(const CustomOp* op);
  int (*GetVariadicOutputHomogeneity)(const CustomOp* op);
  Status* (*CreateKernelV2)(const CustomOp* op, const Api* api, const KernelInfo* info, void** kernel);
  Status* (*KernelComputeV2)(void* kernel, KernelContext* ctx);
  Status* (*InferOutputShapeFn)(const CustomOp* op, void* shape_ctx);
  int (*GetStartVersion)(const CustomOp* op);
  int (*GetEndVersion)(const CustomOp* op);
  void* later[4];  // GetMayInplace, ReleaseMayInplace, GetAliasMap, ReleaseAliasMap
};

}  // namespace ort
}  // namespace qvl
