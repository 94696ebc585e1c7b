// Registration of the TreeAttention custom op (domain "streamspec") with ONNX Runtime.
//
// Built with g++ against the ORT headers (lite custom-op API).  The CPU-only library
// registers the CPU kernels (float32, float16); the CUDA library (STREAMSPEC_WITH_CUDA)
// also registers the CUDA kernels, whose device code lives behind the plain C++
// launcher of tree_attention_cuda.h (nvcc cannot parse the lite custom-op header).
//
// ORT API negotiation.  The headers are ORT API 29 but the library only calls
// functions that exist since ORT API 17 (onnxruntime 1.17): KernelContext_ParallelFor
// is the newest (API 17) and KernelComputeV2, which lets the kernel return a status, is
// honoured from op version 16.  The lite header's Tensor::Data() would need
// GetTensorData (API 23), so input pointers are read with GetTensorMutableData (API 1)
// instead.  At registration we ask for GetApi(17) and stamp every OrtCustomOp with
// min(29, runtime API): ORT releases before the version cap refuse ops whose version
// is newer than their own API.  Older runtimes get a one-sentence error status.
//
// In-place KV cache.  Outputs 1 and 2 (key_cache_out, value_cache_out) are meant to be
// the very buffers of inputs 3 and 4.  With IO binding, binding one OrtValue as both
// input and output makes ORT hand the kernel the same pointer for both, and the kernel
// then updates the cache in place (only the compaction targets and rows
// [past, past + N) are written).  When the pointers differ (a plain Run, where ORT
// allocates the outputs), the kernel first copies the input cache into the output and
// updates the copy, so inputs are never modified.  We also declare the pairs with
// OrtCustomOp::GetMayInplace (read by ORT >= 1.18), a hint that lets ORT's allocation
// planner reuse the input buffer when the cache is an intermediate value; we do not
// declare GetAliasMap, because a forced alias on a graph input would make a plain Run
// write into the caller's input array.
#define ORT_API_MANUAL_INIT
#include "onnxruntime_lite_custom_op.h"
#undef ORT_API_MANUAL_INIT

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "tree_attention.h"
#ifdef STREAMSPEC_WITH_CUDA
#include "tree_attention_cuda.h"
#endif

#ifndef STREAMSPEC_CUDA_ARCHS
#define STREAMSPEC_CUDA_ARCHS ""
#endif

namespace streamspec {
namespace {

constexpr uint32_t kMinOrtApi = 17;  // onnxruntime 1.17
constexpr const char* kDomain = "streamspec";
constexpr const char* kOpName = "TreeAttention";

using Ort::Custom::Tensor;
using Shape = std::vector<int64_t>;

const OrtApi& Api() { return Ort::GetApi(); }

// ---------------------------------------------------------------------------------
// Attributes and shape checks shared by the CPU and CUDA kernels.

struct Attributes {
  int64_t num_heads = 0;
  int64_t kv_num_heads = 0;
  int64_t num_streams = 0;
  float scale = 0.f;
  std::string error;  // set when an attribute is missing or invalid
};

bool ReadInt(const OrtApi* api, const OrtKernelInfo* info, const char* name, int64_t* out) {
  OrtStatus* st = api->KernelInfoGetAttribute_int64(info, name, out);
  if (st == nullptr) return true;
  api->ReleaseStatus(st);
  return false;
}

Attributes ReadAttributes(const OrtApi* api, const OrtKernelInfo* info) {
  Attributes a;
  if (!ReadInt(api, info, "num_heads", &a.num_heads)) a.error = "TreeAttention: attribute num_heads is missing";
  if (a.error.empty() && !ReadInt(api, info, "kv_num_heads", &a.kv_num_heads)) {
    a.error = "TreeAttention: attribute kv_num_heads is missing";
  }
  if (!ReadInt(api, info, "num_streams", &a.num_streams)) a.num_streams = 0;
  OrtStatus* st = api->KernelInfoGetAttribute_float(info, "scale", &a.scale);
  if (st != nullptr) {
    api->ReleaseStatus(st);
    a.scale = 0.f;
  }
  if (a.error.empty()) {
    if (a.num_heads <= 0 || a.kv_num_heads <= 0 || a.num_heads % a.kv_num_heads != 0) {
      a.error = "TreeAttention: num_heads (" + std::to_string(a.num_heads) +
                ") must be a positive multiple of kv_num_heads (" + std::to_string(a.kv_num_heads) + ")";
    } else if (a.num_streams < 0) {
      a.error = "TreeAttention: num_streams must be >= 0, got " + std::to_string(a.num_streams);
    } else if (!std::isfinite(a.scale)) {
      a.error = "TreeAttention: scale must be finite";
    }
  }
  return a;
}

std::string ShapeStr(const Shape& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

// Checks every input shape and fills `shape`; returns an empty string or one sentence.
std::string CheckShapes(const Attributes& a, const Shape& query, const Shape& key, const Shape& value,
                        const Shape& key_cache, const Shape& value_cache, const Shape& past,
                        const Shape& parent, const Shape& compact, TreeAttentionShape* shape) {
  if (!a.error.empty()) return a.error;
  if (query.size() != 3 || query[0] != 1) {
    return "TreeAttention: query must be [1, S, num_heads * head_dim], got " + ShapeStr(query);
  }
  const int64_t seq = query[1];
  if (query[2] % a.num_heads != 0 || query[2] == 0) {
    return "TreeAttention: query width " + std::to_string(query[2]) + " is not a multiple of num_heads " +
           std::to_string(a.num_heads);
  }
  const int64_t hd = query[2] / a.num_heads;
  const Shape kv_expect{1, seq, a.kv_num_heads * hd};
  if (key != kv_expect) return "TreeAttention: key must be " + ShapeStr(kv_expect) + ", got " + ShapeStr(key);
  if (value != kv_expect) return "TreeAttention: value must be " + ShapeStr(kv_expect) + ", got " + ShapeStr(value);
  if (key_cache.size() != 4 || key_cache[0] != 1 || key_cache[1] != a.kv_num_heads || key_cache[3] != hd) {
    return "TreeAttention: key_cache must be [1, " + std::to_string(a.kv_num_heads) + ", max_len, " +
           std::to_string(hd) + "], got " + ShapeStr(key_cache);
  }
  if (value_cache != key_cache) {
    return "TreeAttention: value_cache " + ShapeStr(value_cache) + " differs from key_cache " + ShapeStr(key_cache);
  }
  int64_t past_elems = 1;
  for (int64_t d : past) past_elems *= d;
  if (past_elems != 1) return "TreeAttention: past_length must hold one value, got shape " + ShapeStr(past);
  if (parent.size() != 1) return "TreeAttention: tree_parent must be 1-D, got " + ShapeStr(parent);
  if (compact.size() != 1) return "TreeAttention: compact_src must be 1-D, got " + ShapeStr(compact);
  const int64_t n = parent[0];
  if (n * (1 + a.num_streams) != seq) {
    return "TreeAttention: query has " + std::to_string(seq) + " rows but " + std::to_string(n) +
           " tree nodes with num_streams " + std::to_string(a.num_streams) + " need " +
           std::to_string(n * (1 + a.num_streams));
  }
  shape->seq = seq;
  shape->num_nodes = n;
  shape->num_streams = a.num_streams;
  shape->num_heads = a.num_heads;
  shape->kv_num_heads = a.kv_num_heads;
  shape->head_dim = hd;
  shape->max_len = key_cache[2];
  shape->num_compact = compact[0];
  shape->scale = a.scale != 0.f ? a.scale : 1.0f / std::sqrt(static_cast<float>(hd));
  if (shape->num_nodes > shape->max_len) {
    return "TreeAttention: " + std::to_string(n) + " tree nodes do not fit a cache of " +
           std::to_string(shape->max_len) + " rows";
  }
  return {};
}

// Value checks that need host access to past_length, tree_parent and compact_src.
std::string CheckValues(const TreeAttentionShape& s, int64_t past, const int32_t* parent, const int32_t* compact) {
  if (past < s.num_compact || past + s.num_nodes > s.max_len) {
    return "TreeAttention: past_length " + std::to_string(past) + " must lie in [" + std::to_string(s.num_compact) +
           ", " + std::to_string(s.max_len - s.num_nodes) + "] for " + std::to_string(s.num_nodes) +
           " tree nodes, " + std::to_string(s.num_compact) + " compacted rows and a cache of " +
           std::to_string(s.max_len) + " rows";
  }
  for (int64_t n = 0; n < s.num_nodes; ++n) {
    if (parent[n] < -1 || parent[n] >= n) {
      return "TreeAttention: tree_parent[" + std::to_string(n) + "] = " + std::to_string(parent[n]) +
             " must be -1 or the index of an earlier node";
    }
  }
  for (int64_t i = 0; i < s.num_compact; ++i) {
    if (compact[i] < 0 || compact[i] >= s.max_len) {
      return "TreeAttention: compact_src[" + std::to_string(i) + "] = " + std::to_string(compact[i]) +
             " is outside the cache of " + std::to_string(s.max_len) + " rows";
    }
  }
  return {};
}

// Input data pointer through GetTensorMutableData (ORT API 1); see the header note.
const void* InputData(OrtKernelContext* ctx, size_t index) {
  const OrtValue* v = nullptr;
  Ort::ThrowOnError(Api().KernelContext_GetInput(ctx, index, &v));
  void* p = nullptr;
  Ort::ThrowOnError(Api().GetTensorMutableData(const_cast<OrtValue*>(v), &p));
  return p;
}

void OrtParallelFor(void* runner, void (*fn)(void*, size_t), size_t total, void* data) {
  static_cast<Ort::KernelContext*>(runner)->ParallelFor(fn, total, 0, data);
}

template <typename T>
constexpr TreeAttentionDType DTypeOf() {
  return std::is_same<T, float>::value ? TreeAttentionDType::kFloat32 : TreeAttentionDType::kFloat16;
}

// ---------------------------------------------------------------------------------
// Kernels (lite custom-op structs).

template <typename T>
struct TreeAttentionCpuKernel {
  TreeAttentionCpuKernel(const OrtApi* api, const OrtKernelInfo* info) : attrs_(ReadAttributes(api, info)) {}

  Ort::Status Compute(OrtKernelContext* ctx, const Tensor<T>& query, const Tensor<T>& key, const Tensor<T>& value,
                      const Tensor<T>& key_cache, const Tensor<T>& value_cache, const Tensor<int64_t>& past_length,
                      const Tensor<int32_t>& tree_parent, const Tensor<int32_t>& compact_src, Tensor<T>& output,
                      Tensor<T>& key_cache_out, Tensor<T>& value_cache_out) {
    try {
      TreeAttentionShape s;
      std::string err = CheckShapes(attrs_, query.Shape(), key.Shape(), value.Shape(), key_cache.Shape(),
                                    value_cache.Shape(), past_length.Shape(), tree_parent.Shape(),
                                    compact_src.Shape(), &s);
      if (!err.empty()) return Ort::Status(err.c_str(), ORT_INVALID_ARGUMENT);
      const int64_t past = *static_cast<const int64_t*>(InputData(ctx, 5));
      const auto* parent = static_cast<const int32_t*>(s.num_nodes ? InputData(ctx, 6) : nullptr);
      const auto* compact = static_cast<const int32_t*>(s.num_compact ? InputData(ctx, 7) : nullptr);
      err = CheckValues(s, past, parent, compact);
      if (!err.empty()) return Ort::Status(err.c_str(), ORT_INVALID_ARGUMENT);

      T* out = output.Allocate({1, s.seq, s.num_heads * s.head_dim});
      T* kc_out = key_cache_out.Allocate(key_cache.Shape());
      T* vc_out = value_cache_out.Allocate(value_cache.Shape());
      Ort::KernelContext kctx(ctx);
      const char* msg = TreeAttentionCpu(DTypeOf<T>(), s, s.seq ? InputData(ctx, 0) : nullptr,
                                         s.seq ? InputData(ctx, 1) : nullptr, s.seq ? InputData(ctx, 2) : nullptr,
                                         InputData(ctx, 3), InputData(ctx, 4), kc_out, vc_out, past, parent,
                                         compact, out, &OrtParallelFor, &kctx);
      if (msg != nullptr) return Ort::Status(msg, ORT_FAIL);
      return Ort::Status{nullptr};
    } catch (const std::exception& e) {
      return Ort::Status((std::string("TreeAttention: ") + e.what()).c_str(), ORT_FAIL);
    }
  }

  Attributes attrs_;
};

#ifdef STREAMSPEC_WITH_CUDA
template <typename T>
struct TreeAttentionCudaKernel {
  TreeAttentionCudaKernel(const OrtApi* api, const OrtKernelInfo* info) : attrs_(ReadAttributes(api, info)) {}

  // past_length, tree_parent and compact_src stay on the device: the kernels read them
  // there (no host synchronisation) and skip out-of-range rows instead of failing.
  Ort::Status Compute(OrtKernelContext* ctx, const Tensor<T>& query, const Tensor<T>& key, const Tensor<T>& value,
                      const Tensor<T>& key_cache, const Tensor<T>& value_cache, const Tensor<int64_t>& past_length,
                      const Tensor<int32_t>& tree_parent, const Tensor<int32_t>& compact_src, Tensor<T>& output,
                      Tensor<T>& key_cache_out, Tensor<T>& value_cache_out) {
    try {
      TreeAttentionCudaArgs args;
      std::string err = CheckShapes(attrs_, query.Shape(), key.Shape(), value.Shape(), key_cache.Shape(),
                                    value_cache.Shape(), past_length.Shape(), tree_parent.Shape(),
                                    compact_src.Shape(), &args.shape);
      if (!err.empty()) return Ort::Status(err.c_str(), ORT_INVALID_ARGUMENT);
      const TreeAttentionShape& s = args.shape;
      args.dtype = DTypeOf<T>();
      args.output = output.Allocate({1, s.seq, s.num_heads * s.head_dim});
      args.key_cache = key_cache_out.Allocate(key_cache.Shape());
      args.value_cache = value_cache_out.Allocate(value_cache.Shape());
      args.query = s.seq ? InputData(ctx, 0) : nullptr;
      args.key = s.seq ? InputData(ctx, 1) : nullptr;
      args.value = s.seq ? InputData(ctx, 2) : nullptr;
      args.key_cache_in = InputData(ctx, 3);
      args.value_cache_in = InputData(ctx, 4);
      args.past_length = static_cast<const int64_t*>(InputData(ctx, 5));
      args.tree_parent = static_cast<const int32_t*>(s.num_nodes ? InputData(ctx, 6) : nullptr);
      args.compact_src = static_cast<const int32_t*>(s.num_compact ? InputData(ctx, 7) : nullptr);
      void* stream = Ort::KernelContext(ctx).GetGPUComputeStream();
      const char* msg = LaunchTreeAttentionCuda(args, stream);
      if (msg != nullptr) return Ort::Status((std::string("TreeAttention (CUDA): ") + msg).c_str(), ORT_FAIL);
      return Ort::Status{nullptr};
    } catch (const std::exception& e) {
      return Ort::Status((std::string("TreeAttention: ") + e.what()).c_str(), ORT_FAIL);
    }
  }

  Attributes attrs_;
};
#endif

// ---------------------------------------------------------------------------------
// In-place hint: output 1 may reuse input 3, output 2 may reuse input 4.

size_t ORT_API_CALL MayInplace(int** input_index, int** output_index) {
  *input_index = new int[2]{3, 4};
  *output_index = new int[2]{1, 2};
  return 2;
}

void ORT_API_CALL ReleaseMayInplace(int* input_index, int* output_index) {
  delete[] input_index;
  delete[] output_index;
}

int OrtMinorVersion(const OrtApiBase* base) {
  const char* v = base->GetVersionString ? base->GetVersionString() : nullptr;
  if (v == nullptr) return -1;
  const char* dot = std::strchr(v, '.');
  return dot ? std::atoi(dot + 1) : -1;
}

// The op objects must outlive every session that uses them; they are created once
// and deliberately never freed (a few hundred bytes), which also avoids destruction
// order problems at process exit.
std::vector<Ort::Custom::OrtLiteCustomOp*>& Ops() {
  static auto* ops = [] {
    auto* v = new std::vector<Ort::Custom::OrtLiteCustomOp*>();
    v->push_back(Ort::Custom::CreateLiteCustomOp<TreeAttentionCpuKernel<float>>(kOpName, "CPUExecutionProvider"));
    v->push_back(
        Ort::Custom::CreateLiteCustomOp<TreeAttentionCpuKernel<Ort::Float16_t>>(kOpName, "CPUExecutionProvider"));
#ifdef STREAMSPEC_WITH_CUDA
    v->push_back(Ort::Custom::CreateLiteCustomOp<TreeAttentionCudaKernel<float>>(kOpName, "CUDAExecutionProvider"));
    v->push_back(
        Ort::Custom::CreateLiteCustomOp<TreeAttentionCudaKernel<Ort::Float16_t>>(kOpName, "CUDAExecutionProvider"));
#endif
    for (auto* op : *v) {
      op->GetMayInplace = &MayInplace;
      op->ReleaseMayInplace = &ReleaseMayInplace;
    }
    return v;
  }();
  return *ops;
}

}  // namespace
}  // namespace streamspec

extern "C" {

// Entry point called by SessionOptions.register_custom_ops_library.
ORT_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  using namespace streamspec;
  const int minor = OrtMinorVersion(api_base);
  if (minor >= 0 && minor < static_cast<int>(kMinOrtApi)) {
    const OrtApi* api1 = api_base->GetApi(1);
    std::string msg = std::string("streamspec TreeAttention needs onnxruntime >= 1.") + std::to_string(kMinOrtApi) +
                      " (ORT API " + std::to_string(kMinOrtApi) + "), this is onnxruntime " +
                      api_base->GetVersionString();
    return api1 ? api1->CreateStatus(ORT_NOT_IMPLEMENTED, msg.c_str()) : nullptr;
  }
  const OrtApi* api = api_base->GetApi(kMinOrtApi);
  if (api == nullptr) {
    const OrtApi* api1 = api_base->GetApi(1);
    return api1 ? api1->CreateStatus(ORT_NOT_IMPLEMENTED,
                                     "streamspec TreeAttention needs ORT API 17 (onnxruntime >= 1.17), "
                                     "which this onnxruntime does not provide")
                : nullptr;
  }
  Ort::InitApi(api);

  // Stamp the ops with the highest API both sides know (capped at our headers).
  uint32_t op_version = ORT_API_VERSION;
  if (minor >= static_cast<int>(kMinOrtApi) && static_cast<uint32_t>(minor) < op_version) {
    op_version = static_cast<uint32_t>(minor);
  }

  static std::mutex mutex;
  std::lock_guard<std::mutex> lock(mutex);
  OrtCustomOpDomain* domain = nullptr;
  if (OrtStatus* st = api->CreateCustomOpDomain(kDomain, &domain)) return st;
  for (auto* op : Ops()) {
    op->version = op_version;
    if (OrtStatus* st = api->CustomOpDomain_Add(domain, op)) return st;
  }
  // The domain must outlive the sessions created from these options; like the ops it
  // is never released.
  return api->AddCustomOpDomain(options, domain);
}

// Build facts, for diagnostics (read with ctypes; needs no ORT).
ORT_EXPORT const char* StreamspecOpsBuildInfo() {
#ifdef STREAMSPEC_WITH_CUDA
#define STREAMSPEC_CUDA_FLAG "true"
#else
#define STREAMSPEC_CUDA_FLAG "false"
#endif
  static const std::string info = std::string("{\"op\": \"streamspec.TreeAttention\", \"min_ort_api\": ") +
                                  std::to_string(streamspec::kMinOrtApi) +
                                  ", \"headers_api\": " + std::to_string(ORT_API_VERSION) +
                                  ", \"cuda\": " STREAMSPEC_CUDA_FLAG ", \"cuda_archs\": \"" STREAMSPEC_CUDA_ARCHS "\"}";
  return info.c_str();
}

}  // extern "C"
