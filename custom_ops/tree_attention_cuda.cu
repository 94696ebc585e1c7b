// TreeAttention CUDA kernels (see tree_attention.h for the semantics).
//
// Two kernels on ORT's compute stream:
//  1. UpdateCache: one thread per (kv head, dim) column of the cache; it performs the
//     lazy KV compaction in ascending order and then writes the tree nodes' keys and
//     values at rows [past, past + N).  Columns are independent, so the sequential
//     order within a column is exactly the op's copy order.
//  2. Attention: one block per (query row, query head), kWarps warps.  Thread 0 builds
//     the row's list of new key rows (tree path, lower streams) in shared memory; the
//     warps then share the keys [cache 0..past) + list round-robin, kKeysPerIter at a
//     time, each lane owning dims lane, lane+32, ...; online softmax in float32
//     (full-precision expf: the kernel is bound by memory, not by exp);
//     finally the warps' partial states are merged through shared memory.
// past_length, tree_parent and compact_src are read on the device: no host sync.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "tree_attention_cuda.h"

namespace streamspec {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kKeysPerIter = 4;
constexpr float kNegBig = -1e30f;

template <typename T>
__device__ __forceinline__ float ToFloat(T x);
template <>
__device__ __forceinline__ float ToFloat<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ float ToFloat<__half>(__half x) {
  return __half2float(x);
}

template <typename T>
__device__ __forceinline__ T FromFloat(float x);
template <>
__device__ __forceinline__ float FromFloat<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half FromFloat<__half>(float x) {
  return __float2half_rn(x);
}

template <typename T>
__global__ void UpdateCacheKernel(const T* __restrict__ key, const T* __restrict__ value, T* key_cache,
                                  T* value_cache, const int64_t* __restrict__ past_length,
                                  const int32_t* __restrict__ compact_src, int64_t num_nodes, int64_t num_compact,
                                  int64_t kv_heads, int64_t max_len, int64_t head_dim) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= kv_heads * head_dim) return;
  const int64_t h = col / head_dim;
  const int64_t d = col % head_dim;
  const int64_t past = *past_length;
  T* kcol = key_cache + h * max_len * head_dim + d;
  T* vcol = value_cache + h * max_len * head_dim + d;
  for (int64_t i = 0; i < num_compact; ++i) {
    const int64_t src = compact_src[i];
    const int64_t dst = past - num_compact + i;
    if (src < 0 || src >= max_len || dst < 0 || dst >= max_len || src == dst) continue;
    kcol[dst * head_dim] = kcol[src * head_dim];
    vcol[dst * head_dim] = vcol[src * head_dim];
  }
  for (int64_t n = 0; n < num_nodes; ++n) {
    const int64_t row = past + n;
    if (row < 0 || row >= max_len) continue;
    kcol[row * head_dim] = key[(n * kv_heads + h) * head_dim + d];
    vcol[row * head_dim] = value[(n * kv_heads + h) * head_dim + d];
  }
}

struct AttentionParams {
  const void* query;
  const void* key;
  const void* value;
  const void* key_cache;
  const void* value_cache;
  void* output;
  const int64_t* past_length;
  const int32_t* tree_parent;
  int num_nodes;
  int num_streams;
  int num_heads;
  int kv_heads;
  int head_dim;
  int64_t max_len;
  float scale;
};

// DPL: dims per lane, ceil(head_dim / 32).
template <typename T, int DPL>
__global__ void __launch_bounds__(kThreads) AttentionKernel(AttentionParams p) {
  extern __shared__ float smem[];
  __shared__ int list_len;
  const int hd = p.head_dim;
  float* partial = smem;                                          // [kWarps][hd + 2]
  int* list = reinterpret_cast<int*>(smem + kWarps * (hd + 2));  // [N + γ]

  const int row = blockIdx.x;
  const int head = blockIdx.y;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int n_nodes = p.num_nodes;
  const int gamma = p.num_streams;

  if (threadIdx.x == 0) {
    const int node = row < n_nodes ? row : (row - n_nodes) / gamma;
    const int streams = row < n_nodes ? 0 : (row - n_nodes) % gamma + 1;
    int count = 0;
    int cur = node;
    while (cur >= 0 && count < n_nodes) {
      list[count++] = cur;
      const int parent = p.tree_parent[cur];
      cur = parent < cur ? parent : -1;  // a parent must be an earlier node
    }
    for (int s = 0; s < streams; ++s) list[count++] = n_nodes + node * gamma + s;
    list_len = count;
  }
  __syncthreads();

  int64_t past = *p.past_length;
  past = past < 0 ? 0 : (past > p.max_len ? p.max_len : past);
  const int64_t total = past + list_len;
  const int kvh = head / (p.num_heads / p.kv_heads);
  const T* query = static_cast<const T*>(p.query);
  const T* key = static_cast<const T*>(p.key);
  const T* value = static_cast<const T*>(p.value);
  const T* kc = static_cast<const T*>(p.key_cache) + static_cast<int64_t>(kvh) * p.max_len * hd;
  const T* vc = static_cast<const T*>(p.value_cache) + static_cast<int64_t>(kvh) * p.max_len * hd;
  const int64_t kv_stride = static_cast<int64_t>(p.kv_heads) * hd;

  float q[DPL];
  float acc[DPL];
  const T* qrow = query + (static_cast<int64_t>(row) * p.num_heads + head) * hd;
#pragma unroll
  for (int t = 0; t < DPL; ++t) {
    const int d = lane + 32 * t;
    q[t] = d < hd ? ToFloat(qrow[d]) * p.scale : 0.f;
    acc[t] = 0.f;
  }
  float m = kNegBig;
  float l = 0.f;

  for (int64_t k0 = static_cast<int64_t>(warp) * kKeysPerIter; k0 < total; k0 += kWarps * kKeysPerIter) {
    const T* krow[kKeysPerIter];
    const T* vrow[kKeysPerIter];
    float s[kKeysPerIter];
#pragma unroll
    for (int u = 0; u < kKeysPerIter; ++u) {
      const int64_t k = k0 + u;
      s[u] = 0.f;
      krow[u] = nullptr;
      vrow[u] = nullptr;
      if (k < total) {
        if (k < past) {
          krow[u] = kc + k * hd;
          vrow[u] = vc + k * hd;
        } else {
          const int64_t src = list[k - past];
          krow[u] = key + src * kv_stride + static_cast<int64_t>(kvh) * hd;
          vrow[u] = value + src * kv_stride + static_cast<int64_t>(kvh) * hd;
        }
#pragma unroll
        for (int t = 0; t < DPL; ++t) {
          const int d = lane + 32 * t;
          if (d < hd) s[u] += q[t] * ToFloat(krow[u][d]);
        }
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
#pragma unroll
      for (int u = 0; u < kKeysPerIter; ++u) s[u] += __shfl_xor_sync(0xffffffffu, s[u], off);
    }
    float mx = m;
#pragma unroll
    for (int u = 0; u < kKeysPerIter; ++u) {
      if (krow[u] != nullptr) mx = fmaxf(mx, s[u]);
    }
    const float corr = expf(m - mx);
    l *= corr;
#pragma unroll
    for (int t = 0; t < DPL; ++t) acc[t] *= corr;
#pragma unroll
    for (int u = 0; u < kKeysPerIter; ++u) {
      if (vrow[u] == nullptr) continue;
      const float w = expf(s[u] - mx);
      l += w;
#pragma unroll
      for (int t = 0; t < DPL; ++t) {
        const int d = lane + 32 * t;
        if (d < hd) acc[t] += w * ToFloat(vrow[u][d]);
      }
    }
    m = mx;
  }

  float* mine = partial + warp * (hd + 2);
#pragma unroll
  for (int t = 0; t < DPL; ++t) {
    const int d = lane + 32 * t;
    if (d < hd) mine[d] = acc[t];
  }
  if (lane == 0) {
    mine[hd] = m;
    mine[hd + 1] = l;
  }
  __syncthreads();

  float gmax = kNegBig;
  for (int w = 0; w < kWarps; ++w) gmax = fmaxf(gmax, partial[w * (hd + 2) + hd]);
  float denom = 0.f;
  for (int w = 0; w < kWarps; ++w) {
    denom += partial[w * (hd + 2) + hd + 1] * expf(partial[w * (hd + 2) + hd] - gmax);
  }
  T* out = static_cast<T*>(p.output) + (static_cast<int64_t>(row) * p.num_heads + head) * hd;
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    float o = 0.f;
    for (int w = 0; w < kWarps; ++w) {
      o += partial[w * (hd + 2) + d] * expf(partial[w * (hd + 2) + hd] - gmax);
    }
    out[d] = FromFloat<T>(o / denom);
  }
}

template <typename T, int DPL>
cudaError_t LaunchAttention(const AttentionParams& p, int seq, size_t smem, cudaStream_t stream) {
  if (smem > 48 * 1024) {
    cudaError_t err = cudaFuncSetAttribute(AttentionKernel<T, DPL>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  dim3 grid(static_cast<unsigned>(seq), static_cast<unsigned>(p.num_heads));
  AttentionKernel<T, DPL><<<grid, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
const char* Launch(const TreeAttentionCudaArgs& a, cudaStream_t stream) {
  const TreeAttentionShape& s = a.shape;
  const size_t cache_bytes = static_cast<size_t>(s.kv_num_heads * s.max_len * s.head_dim) * sizeof(T);
  // Outputs that ORT allocated separately get a copy of the input cache first, so the
  // inputs stay untouched; with one bound buffer the update is in place.
  if (a.key_cache != a.key_cache_in) {
    const cudaError_t err =
        cudaMemcpyAsync(a.key_cache, a.key_cache_in, cache_bytes, cudaMemcpyDeviceToDevice, stream);
    if (err != cudaSuccess) return cudaGetErrorString(err);
  }
  if (a.value_cache != a.value_cache_in) {
    const cudaError_t err =
        cudaMemcpyAsync(a.value_cache, a.value_cache_in, cache_bytes, cudaMemcpyDeviceToDevice, stream);
    if (err != cudaSuccess) return cudaGetErrorString(err);
  }
  const int64_t columns = s.kv_num_heads * s.head_dim;
  if (columns > 0 && (s.num_nodes > 0 || s.num_compact > 0)) {
    const int threads = 128;
    const unsigned blocks = static_cast<unsigned>((columns + threads - 1) / threads);
    UpdateCacheKernel<T><<<blocks, threads, 0, stream>>>(
        static_cast<const T*>(a.key), static_cast<const T*>(a.value), static_cast<T*>(a.key_cache),
        static_cast<T*>(a.value_cache), a.past_length, a.compact_src, s.num_nodes, s.num_compact, s.kv_num_heads,
        s.max_len, s.head_dim);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return cudaGetErrorString(err);
  }
  if (s.seq == 0) return nullptr;

  AttentionParams p;
  p.query = a.query;
  p.key = a.key;
  p.value = a.value;
  p.key_cache = a.key_cache;
  p.value_cache = a.value_cache;
  p.output = a.output;
  p.past_length = a.past_length;
  p.tree_parent = a.tree_parent;
  p.num_nodes = static_cast<int>(s.num_nodes);
  p.num_streams = static_cast<int>(s.num_streams);
  p.num_heads = static_cast<int>(s.num_heads);
  p.kv_heads = static_cast<int>(s.kv_num_heads);
  p.head_dim = static_cast<int>(s.head_dim);
  p.max_len = s.max_len;
  p.scale = s.scale;
  const size_t smem = static_cast<size_t>(kWarps * (s.head_dim + 2)) * sizeof(float) +
                      static_cast<size_t>(s.num_nodes + s.num_streams) * sizeof(int);
  if (smem > 160 * 1024) return "tree too large for the CUDA kernel's shared memory";
  if (s.num_heads > 65535) return "more than 65535 heads";

  cudaError_t err;
  const int64_t hd = s.head_dim;
  if (hd <= 32) {
    err = LaunchAttention<T, 1>(p, static_cast<int>(s.seq), smem, stream);
  } else if (hd <= 64) {
    err = LaunchAttention<T, 2>(p, static_cast<int>(s.seq), smem, stream);
  } else if (hd <= 96) {
    err = LaunchAttention<T, 3>(p, static_cast<int>(s.seq), smem, stream);
  } else if (hd <= 128) {
    err = LaunchAttention<T, 4>(p, static_cast<int>(s.seq), smem, stream);
  } else if (hd <= 256) {
    err = LaunchAttention<T, 8>(p, static_cast<int>(s.seq), smem, stream);
  } else {
    return "head_dim above 256 is not supported by the CUDA kernel";
  }
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

const char* LaunchTreeAttentionCuda(const TreeAttentionCudaArgs& args, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (args.dtype == TreeAttentionDType::kFloat32) return Launch<float>(args, s);
  return Launch<__half>(args, s);
}

}  // namespace streamspec
