// TreeAttention CPU kernel (no ONNX Runtime dependency; see tree_attention.h).
//
// Work split: one task per (query head, block of up to kRowBlock query rows), run on
// the caller's parallel-for.  Inside a task the committed cache [0, past) is walked in
// tiles of kKeyTile keys shared by all rows of the block (online softmax, float32
// accumulators); then each row visits its own short list of new keys (its tree path
// and, for stream rows, the lower streams of the same node).  The inner loops (dot
// products, axpy, exp) are written so that the compiler vectorises them without
// -ffast-math; on x86-64 the hot function is additionally cloned for AVX2+FMA and
// picked at load time, so the library stays portable.
#include "tree_attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

namespace streamspec {
namespace {

constexpr int64_t kRowBlock = 16;
constexpr int64_t kKeyTile = 64;

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(STREAMSPEC_NO_CLONES)
#define STREAMSPEC_HOT __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define STREAMSPEC_HOT
#endif

#if defined(__GNUC__)
#define STREAMSPEC_INLINE inline __attribute__((always_inline))
#else
#define STREAMSPEC_INLINE inline
#endif

STREAMSPEC_INLINE uint32_t FloatBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
STREAMSPEC_INLINE float BitsFloat(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// IEEE half -> float, exact (normals, subnormals, inf, nan), branch-free.
STREAMSPEC_INLINE float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;
  // Shift exponent+mantissa into place and rescale the exponent bias by 2^(127-15);
  // the multiplication also normalises subnormal halves.
  const float scaled = BitsFloat(em << 13) * 5.192296858534828e+33f;  // 2^112
  const uint32_t finite = FloatBits(scaled);
  const uint32_t special = (em << 13) | 0x7f800000u;  // inf / nan keep their payload
  return BitsFloat((em >= 0x7c00u ? special : finite) | sign);
}

// float -> IEEE half, round to nearest even.
STREAMSPEC_INLINE uint16_t FloatToHalf(float f) {
  uint32_t x = FloatBits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  x &= 0x7fffffffu;
  uint32_t h;
  if (x >= 0x47800000u) {  // |f| >= 65536, inf or nan
    h = x > 0x7f800000u ? 0x7e00u : 0x7c00u;
  } else if (x < 0x38800000u) {  // below the smallest normal half: subnormal or zero
    // Adding 0.5 puts the value on a grid of 2^-24 (the half subnormal step) and
    // rounds to nearest even in the process.
    h = FloatBits(BitsFloat(x) + 0.5f) - 0x3f000000u;
  } else {
    const uint32_t odd = (x >> 13) & 1u;
    x += 0xc8000fffu + odd;  // rebias the exponent (-112 << 23) and round
    h = x >> 13;
  }
  return static_cast<uint16_t>(h | sign);
}

// exp(x) for x <= 0 (scores minus the running maximum), relative error ~1e-7.
// Branch-free so that loops over it vectorise; inputs below -87 flush to ~1e-38.
STREAMSPEC_INLINE float ExpNonPositive(float x) {
  x = std::max(x, -87.0f);
  const float kLog2e = 1.44269504088896341f;
  const float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float t = x * kLog2e + kRound;
  const float n = t - kRound;
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  // Taylor series of exp(r), |r| <= ln2/2, degree 7.
  float p = 1.984126984126984e-04f;
  p = p * r + 1.388888888888889e-03f;
  p = p * r + 8.333333333333333e-03f;
  p = p * r + 4.166666666666667e-02f;
  p = p * r + 1.666666666666667e-01f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t ni = static_cast<int32_t>(n);
  return p * BitsFloat(static_cast<uint32_t>(ni + 127) << 23);
}

STREAMSPEC_INLINE float Dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  // Eight independent partial sums: vectorisable without reassociation flags.
  float part[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t d = 0;
  for (; d + 8 <= n; d += 8) {
    for (int l = 0; l < 8; ++l) part[l] += a[d + l] * b[d + l];
  }
  float s = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
  for (; d < n; ++d) s += a[d] * b[d];
  return s;
}

STREAMSPEC_INLINE void Axpy(float* __restrict y, float a, const float* __restrict x, int64_t n) {
  for (int64_t d = 0; d < n; ++d) y[d] += a * x[d];
}

STREAMSPEC_INLINE void Scale(float* __restrict y, float a, int64_t n) {
  for (int64_t d = 0; d < n; ++d) y[d] *= a;
}

template <typename T>
STREAMSPEC_INLINE void LoadRow(float* __restrict dst, const T* __restrict src, int64_t n);
template <>
STREAMSPEC_INLINE void LoadRow<float>(float* __restrict dst, const float* __restrict src, int64_t n) {
  std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
}
template <>
STREAMSPEC_INLINE void LoadRow<uint16_t>(float* __restrict dst, const uint16_t* __restrict src, int64_t n) {
  for (int64_t d = 0; d < n; ++d) dst[d] = HalfToFloat(src[d]);
}

template <typename T>
STREAMSPEC_INLINE void StoreRow(T* __restrict dst, const float* __restrict src, float mul, int64_t n);
template <>
STREAMSPEC_INLINE void StoreRow<float>(float* __restrict dst, const float* __restrict src, float mul, int64_t n) {
  for (int64_t d = 0; d < n; ++d) dst[d] = src[d] * mul;
}
template <>
STREAMSPEC_INLINE void StoreRow<uint16_t>(uint16_t* __restrict dst, const float* __restrict src, float mul, int64_t n) {
  for (int64_t d = 0; d < n; ++d) dst[d] = FloatToHalf(src[d] * mul);
}

template <typename T>
struct Job {
  TreeAttentionShape shape;
  const T* query;
  const T* key;
  const T* value;
  const T* key_cache;    // after compaction and the new rows (the output buffer)
  const T* value_cache;
  T* output;
  int64_t past;
  int64_t row_blocks;
  // CSR list, per query row, of the new rows (indices into key/value) it attends to.
  std::vector<int32_t> list_offsets;
  std::vector<int32_t> list_rows;
};

// Online-softmax state of one query row.
struct RowState {
  float m;
  float l;
};

template <typename T>
STREAMSPEC_INLINE void RunTaskImpl(const Job<T>& job, size_t task) {
  const TreeAttentionShape& sh = job.shape;
  const int64_t hd = sh.head_dim;
  const int64_t head = static_cast<int64_t>(task) / job.row_blocks;
  const int64_t block = static_cast<int64_t>(task) % job.row_blocks;
  const int64_t r0 = block * kRowBlock;
  const int64_t rows = std::min(kRowBlock, sh.seq - r0);
  const int64_t group = sh.num_heads / sh.kv_num_heads;
  const int64_t kvh = head / group;
  const int64_t q_stride = sh.num_heads * hd;
  const int64_t kv_stride = sh.kv_num_heads * hd;

  // Scratch: q[rows][hd], acc[rows][hd], scores[kKeyTile], key/value tiles (fp16).
  thread_local std::vector<float> scratch;
  const size_t need = static_cast<size_t>((2 * kRowBlock + 2 * kKeyTile) * hd + kKeyTile + 2 * hd);
  if (scratch.size() < need) scratch.resize(need);
  float* q = scratch.data();
  float* acc = q + kRowBlock * hd;
  float* k_tile = acc + kRowBlock * hd;
  float* v_tile = k_tile + kKeyTile * hd;
  float* scores = v_tile + kKeyTile * hd;
  float* k_row = scores + kKeyTile;
  float* v_row = k_row + hd;

  RowState state[kRowBlock];
  for (int64_t i = 0; i < rows; ++i) {
    float* qi = q + i * hd;
    LoadRow<T>(qi, job.query + (r0 + i) * q_stride + head * hd, hd);
    Scale(qi, sh.scale, hd);
    std::fill(acc + i * hd, acc + (i + 1) * hd, 0.f);
    state[i] = {-1e30f, 0.f};
  }

  // 1. The committed cache [0, past), shared by every row of the block.
  const T* kc = job.key_cache + kvh * sh.max_len * hd;
  const T* vc = job.value_cache + kvh * sh.max_len * hd;
  for (int64_t t0 = 0; t0 < job.past; t0 += kKeyTile) {
    const int64_t nk = std::min(kKeyTile, job.past - t0);
    const float* kt;
    const float* vt;
    if constexpr (std::is_same<T, float>::value) {
      kt = kc + t0 * hd;
      vt = vc + t0 * hd;
    } else {
      LoadRow<T>(k_tile, kc + t0 * hd, nk * hd);
      LoadRow<T>(v_tile, vc + t0 * hd, nk * hd);
      kt = k_tile;
      vt = v_tile;
    }
    for (int64_t i = 0; i < rows; ++i) {
      const float* qi = q + i * hd;
      float* ai = acc + i * hd;
      float mx = state[i].m;
      for (int64_t k = 0; k < nk; ++k) {
        scores[k] = Dot(qi, kt + k * hd, hd);
        mx = std::max(mx, scores[k]);
      }
      const float corr = ExpNonPositive(state[i].m - mx);
      float sum = 0.f;
      for (int64_t k = 0; k < nk; ++k) {
        scores[k] = ExpNonPositive(scores[k] - mx);
        sum += scores[k];
      }
      state[i].l = state[i].l * corr + sum;
      state[i].m = mx;
      Scale(ai, corr, hd);
      for (int64_t k = 0; k < nk; ++k) Axpy(ai, scores[k], vt + k * hd, hd);
    }
  }

  // 2. Each row's own new keys: its tree path, and lower streams of the same node.
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t r = r0 + i;
    const float* qi = q + i * hd;
    float* ai = acc + i * hd;
    for (int32_t e = job.list_offsets[r]; e < job.list_offsets[r + 1]; ++e) {
      const int64_t src = job.list_rows[e];
      LoadRow<T>(k_row, job.key + src * kv_stride + kvh * hd, hd);
      LoadRow<T>(v_row, job.value + src * kv_stride + kvh * hd, hd);
      const float s = Dot(qi, k_row, hd);
      const float mx = std::max(state[i].m, s);
      const float corr = ExpNonPositive(state[i].m - mx);
      const float p = ExpNonPositive(s - mx);
      state[i].l = state[i].l * corr + p;
      state[i].m = mx;
      Scale(ai, corr, hd);
      Axpy(ai, p, v_row, hd);
    }
    StoreRow<T>(job.output + r * q_stride + head * hd, ai, 1.0f / state[i].l, hd);
  }
}

// Non-template entry points, so that the x86-64 clones apply to whole tasks.
STREAMSPEC_HOT void RunTask(const Job<float>& job, size_t task) { RunTaskImpl<float>(job, task); }
STREAMSPEC_HOT void RunTask(const Job<uint16_t>& job, size_t task) { RunTaskImpl<uint16_t>(job, task); }

template <typename T>
void RunTaskThunk(void* data, size_t task) {
  RunTask(*static_cast<const Job<T>*>(data), task);
}

template <typename T>
const char* Run(const TreeAttentionShape& sh, const T* query, const T* key, const T* value,
                const T* key_cache_in, const T* value_cache_in, T* key_cache, T* value_cache,
                int64_t past, const int32_t* tree_parent, const int32_t* compact_src, T* output,
                ParallelForFn parallel_for, void* runner) {
  const int64_t hd = sh.head_dim;
  const int64_t n_nodes = sh.num_nodes;
  const int64_t gamma = sh.num_streams;
  const size_t row_bytes = static_cast<size_t>(hd) * sizeof(T);
  const size_t head_elems = static_cast<size_t>(sh.max_len * hd);

  // Cache update.  When ORT gave the output its own buffer, copy the input cache over
  // first so that the input stays untouched; when both are one buffer (IO binding with
  // one OrtValue as input and output) everything below happens in place.
  if (key_cache != key_cache_in) {
    std::memcpy(key_cache, key_cache_in, head_elems * sh.kv_num_heads * sizeof(T));
  }
  if (value_cache != value_cache_in) {
    std::memcpy(value_cache, value_cache_in, head_elems * sh.kv_num_heads * sizeof(T));
  }
  for (int64_t h = 0; h < sh.kv_num_heads; ++h) {
    T* kc = key_cache + h * head_elems;
    T* vc = value_cache + h * head_elems;
    // Lazy KV backtracking, ascending (each move reads a row at or after its target).
    for (int64_t i = 0; i < sh.num_compact; ++i) {
      const int64_t src = compact_src[i];
      const int64_t dst = past - sh.num_compact + i;
      if (src == dst) continue;
      std::memcpy(kc + dst * hd, kc + src * hd, row_bytes);
      std::memcpy(vc + dst * hd, vc + src * hd, row_bytes);
    }
    // The tree nodes' keys/values; stream rows are never cached.
    for (int64_t n = 0; n < n_nodes; ++n) {
      std::memcpy(kc + (past + n) * hd, key + (n * sh.kv_num_heads + h) * hd, row_bytes);
      std::memcpy(vc + (past + n) * hd, value + (n * sh.kv_num_heads + h) * hd, row_bytes);
    }
  }
  if (sh.seq == 0) return nullptr;

  Job<T> job;
  job.shape = sh;
  job.query = query;
  job.key = key;
  job.value = value;
  job.key_cache = key_cache;
  job.value_cache = value_cache;
  job.output = output;
  job.past = past;
  job.row_blocks = (sh.seq + kRowBlock - 1) / kRowBlock;

  // Path of every node (root first), then the per-row lists.
  std::vector<int32_t> depth(static_cast<size_t>(n_nodes));
  for (int64_t n = 0; n < n_nodes; ++n) {
    const int32_t p = tree_parent[n];
    depth[n] = p < 0 ? 1 : depth[p] + 1;
  }
  job.list_offsets.resize(static_cast<size_t>(sh.seq + 1));
  job.list_offsets[0] = 0;
  for (int64_t r = 0; r < sh.seq; ++r) {
    int64_t len;
    if (r < n_nodes) {
      len = depth[r];
    } else {
      const int64_t n = (r - n_nodes) / gamma;
      const int64_t j = (r - n_nodes) % gamma + 1;
      len = depth[n] + j;
    }
    job.list_offsets[r + 1] = job.list_offsets[r] + static_cast<int32_t>(len);
  }
  job.list_rows.resize(static_cast<size_t>(job.list_offsets[sh.seq]));
  for (int64_t r = 0; r < sh.seq; ++r) {
    const int64_t node = r < n_nodes ? r : (r - n_nodes) / gamma;
    int32_t* out = job.list_rows.data() + job.list_offsets[r];
    int64_t e = depth[node];
    for (int64_t cur = node; cur >= 0; cur = tree_parent[cur]) out[--e] = static_cast<int32_t>(cur);
    if (r >= n_nodes) {
      const int64_t j = (r - n_nodes) % gamma + 1;
      for (int64_t s = 0; s < j; ++s) out[depth[node] + s] = static_cast<int32_t>(n_nodes + node * gamma + s);
    }
  }

  const size_t tasks = static_cast<size_t>(sh.num_heads * job.row_blocks);
  if (parallel_for != nullptr && tasks > 1) {
    parallel_for(runner, &RunTaskThunk<T>, tasks, &job);
  } else {
    for (size_t t = 0; t < tasks; ++t) RunTask(job, t);
  }
  return nullptr;
}

}  // namespace

const char* TreeAttentionCpu(TreeAttentionDType dtype, const TreeAttentionShape& shape,
                             const void* query, const void* key, const void* value,
                             const void* key_cache_in, const void* value_cache_in,
                             void* key_cache_out, void* value_cache_out, int64_t past_length,
                             const int32_t* tree_parent, const int32_t* compact_src,
                             void* output, ParallelForFn parallel_for, void* runner) {
  if (dtype == TreeAttentionDType::kFloat32) {
    return Run<float>(shape, static_cast<const float*>(query), static_cast<const float*>(key),
                      static_cast<const float*>(value), static_cast<const float*>(key_cache_in),
                      static_cast<const float*>(value_cache_in), static_cast<float*>(key_cache_out),
                      static_cast<float*>(value_cache_out), past_length, tree_parent, compact_src,
                      static_cast<float*>(output), parallel_for, runner);
  }
  return Run<uint16_t>(shape, static_cast<const uint16_t*>(query), static_cast<const uint16_t*>(key),
                       static_cast<const uint16_t*>(value), static_cast<const uint16_t*>(key_cache_in),
                       static_cast<const uint16_t*>(value_cache_in), static_cast<uint16_t*>(key_cache_out),
                       static_cast<uint16_t*>(value_cache_out), past_length, tree_parent, compact_src,
                       static_cast<uint16_t*>(output), parallel_for, runner);
}

}  // namespace streamspec
