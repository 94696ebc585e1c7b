// TreeAttention: shared declarations of the CPU and CUDA kernels.
//
// This header is plain C++17 and includes nothing from ONNX Runtime, so that both
// g++ (registration, CPU kernel) and nvcc (CUDA kernel) can read it.
//
// Semantics (domain "streamspec", op "TreeAttention", version 1):
//   query        [1, S, num_heads * head_dim]     S = N * (1 + num_streams)
//   key, value   [1, S, kv_num_heads * head_dim]
//   key_cache, value_cache [1, kv_num_heads, max_len, head_dim]  (updated in place)
//   past_length  int64 [1]    committed rows in the cache after this step's compaction
//   tree_parent  int32 [N]    parent of each tree node, -1 for the root, parents first
//   compact_src  int32 [M]    cache row compact_src[i] moves to past_length - M + i
// Rows [0, N) of query/key/value are the tree nodes (main rows); row N + n*γ + (j-1)
// is stream j of node n.  Main row n attends to the cache [0, past) and to its
// ancestors-or-self among the main rows; stream row (n, j) attends to the cache, the
// ancestors-or-self of n and streams 1..j of n.  Only the N main rows' keys/values are
// written to the cache (rows past .. past+N-1).
#pragma once

#include <cstddef>
#include <cstdint>

namespace streamspec {

struct TreeAttentionShape {
  int64_t seq = 0;           // S, rows of query/key/value
  int64_t num_nodes = 0;     // N, tree nodes (main rows)
  int64_t num_streams = 0;   // γ, stream rows per node
  int64_t num_heads = 0;     // query heads
  int64_t kv_num_heads = 0;  // key/value heads (grouped-query attention)
  int64_t head_dim = 0;
  int64_t max_len = 0;       // rows of the fixed-size cache
  int64_t num_compact = 0;   // M, length of compact_src
  float scale = 0.f;         // already resolved (never 0 here)
};

// Element type tag shared by the CPU and CUDA entry points.  float16 travels as its
// raw 16 bits (uint16_t); the kernels convert to float32 and accumulate in float32.
enum class TreeAttentionDType : int { kFloat32 = 0, kFloat16 = 1 };

// A parallel-for provided by the caller (ORT's intra-op thread pool in practice):
// runs fn(data, i) for every i in [0, total).
using ParallelForFn = void (*)(void* runner, void (*fn)(void*, size_t), size_t total, void* data);

// CPU kernel.  All pointers are host memory.  key_cache_out / value_cache_out may be
// the same buffers as key_cache_in / value_cache_in (in-place update) or different
// ones (then the inputs are copied first and left untouched).  Shapes and values must
// have been validated (CheckShapes / CheckValues in register_ops.cc): past_length in
// [M, max_len - N], tree_parent[n] in [-1, n), compact_src in [0, max_len).  Returns
// nullptr or a static error message.
const char* TreeAttentionCpu(TreeAttentionDType dtype, const TreeAttentionShape& shape,
                             const void* query, const void* key, const void* value,
                             const void* key_cache_in, const void* value_cache_in,
                             void* key_cache_out, void* value_cache_out, int64_t past_length,
                             const int32_t* tree_parent, const int32_t* compact_src,
                             void* output, ParallelForFn parallel_for, void* runner);

}  // namespace streamspec
