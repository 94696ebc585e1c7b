// TreeAttention CUDA launcher: plain C++ interface between the registration (g++) and
// the kernels in tree_attention_cuda.cu (nvcc).  No CUDA or ORT types appear here.
#pragma once

#include "tree_attention.h"

namespace streamspec {

struct TreeAttentionCudaArgs {
  TreeAttentionDType dtype = TreeAttentionDType::kFloat32;
  TreeAttentionShape shape;
  // Device pointers.
  const void* query = nullptr;           // [1, S, num_heads * head_dim]
  const void* key = nullptr;             // [1, S, kv_num_heads * head_dim]
  const void* value = nullptr;
  const void* key_cache_in = nullptr;    // [1, kv_num_heads, max_len, head_dim]
  const void* value_cache_in = nullptr;
  void* key_cache = nullptr;             // output buffers, may equal the inputs
  void* value_cache = nullptr;
  void* output = nullptr;                // [1, S, num_heads * head_dim]
  const int64_t* past_length = nullptr;  // [1]
  const int32_t* tree_parent = nullptr;  // [N]
  const int32_t* compact_src = nullptr;  // [M]
};

// Enqueues the cache update and the attention on `stream` (a cudaStream_t; null means
// the default stream).  Returns nullptr or a static error message.  Values that only
// the device knows (past_length, tree_parent, compact_src) are not validated on the
// host: rows out of range are skipped and a parent that is not an earlier node ends
// the path.
const char* LaunchTreeAttentionCuda(const TreeAttentionCudaArgs& args, void* stream);

}  // namespace streamspec
