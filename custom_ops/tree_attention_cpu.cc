// TreeAttention CPU kernel (no ONNX Runtime dependency; see tree_attention.h).
//
// Work split.  A "virtual row" is a (query head, query row) pair; the heads of one kv
// group share every key and value, so a task takes a kv head and a block of kRows = 16
// virtual rows of its group, and - when that leaves fewer than eight tasks - a slice
// of the committed cache (split-K, merged afterwards).  Tasks run on the caller's
// parallel-for (ORT's intra-op thread pool).
//
// Inside a task the committed cache is walked in tiles of kKeyTile keys with the
// scores kept transposed, [key][16 rows]: the rows are the vector lanes, so the score
// product reads the cache rows as they lie (no transposition), the online softmax is
// vectorised across rows, and the value product is a register-blocked 4 rows x 16
// dims update.  Afterwards every row visits its own short list of new keys (its tree
// path, and for stream rows the lower streams of the same node).  Float32 accumulation
// throughout; float16 caches are converted once per call in a parallel pre-pass.
//
// The vector code uses GCC/Clang vector extensions (8 floats), which lower to AVX, SSE
// or NEON as the target allows; on x86-64 the task functions are also cloned for
// x86-64-v3 (AVX2 + FMA) and picked at load time, so the library stays portable.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "tree_attention.h"

#if defined(__GNUC__) && !defined(__clang__)
// The vector helpers below are always inlined; the ABI note about returning AVX vectors
// from non-AVX functions does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace streamspec {
namespace {

constexpr int64_t kRows = 16;     // virtual rows per task = two 8-float vectors
constexpr int64_t kKeyTile = 64;  // keys per softmax step
constexpr int64_t kMinTasks = 8;  // below this, split the cache between tasks

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

// ---------------------------------------------------------------------------------
// Scalar helpers

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

// Constants of exp(x) = 2^n * exp(r), x = n ln2 + r, |r| <= ln2/2 (Cody-Waite split of
// ln2, Taylor polynomial of degree 7: relative error ~1e-7).
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
constexpr float kLn2Hi = 0.693145751953125f;
constexpr float kLn2Lo = 1.428606765330187e-06f;
constexpr float kExpMin = -87.0f;  // exp(-87) ~ 1.6e-38, still a normal float

// exp(x) for x <= 0 (a score minus the running maximum).
STREAMSPEC_INLINE float ExpNonPositive(float x) {
  x = std::max(x, kExpMin);
  const float n = (x * kLog2e + kRound) - kRound;
  const float r = (x - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.984126984126984e-04f;
  p = p * r + 1.388888888888889e-03f;
  p = p * r + 8.333333333333333e-03f;
  p = p * r + 4.166666666666667e-02f;
  p = p * r + 1.666666666666667e-01f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return p * BitsFloat(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
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

STREAMSPEC_INLINE void LoadRow(float* __restrict dst, const float* __restrict src, int64_t n) {
  std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
}
STREAMSPEC_INLINE void LoadRow(float* __restrict dst, const uint16_t* __restrict src, int64_t n) {
  for (int64_t d = 0; d < n; ++d) dst[d] = HalfToFloat(src[d]);
}

STREAMSPEC_INLINE void StoreRow(float* __restrict dst, const float* __restrict src, float mul, int64_t n) {
  for (int64_t d = 0; d < n; ++d) dst[d] = src[d] * mul;
}
STREAMSPEC_INLINE void StoreRow(uint16_t* __restrict dst, const float* __restrict src, float mul, int64_t n) {
  for (int64_t d = 0; d < n; ++d) dst[d] = FloatToHalf(src[d] * mul);
}

// ---------------------------------------------------------------------------------
// Eight-float vectors.  Products are written scalar * vector, which compiles to a
// broadcast multiply-add.

#if defined(__GNUC__) && !defined(STREAMSPEC_PORTABLE_VECTORS)
typedef float V8 __attribute__((vector_size(32)));
typedef int32_t V8i __attribute__((vector_size(32)));
STREAMSPEC_INLINE V8 Max8(const V8& a, const V8& b) { return a > b ? a : b; }
STREAMSPEC_INLINE V8 Exp8(const V8& arg) {  // vector ExpNonPositive
  const V8 lo = V8{} + kExpMin;
  const V8 x = arg < lo ? lo : arg;
  const V8 n = (x * kLog2e + kRound) - kRound;
  const V8 r = (x - n * kLn2Hi) - n * kLn2Lo;
  V8 p = V8{} + 1.984126984126984e-04f;
  p = p * r + 1.388888888888889e-03f;
  p = p * r + 8.333333333333333e-03f;
  p = p * r + 4.166666666666667e-02f;
  p = p * r + 1.666666666666667e-01f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const V8i bits = (__builtin_convertvector(n, V8i) + 127) << 23;
  V8 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
#else
struct V8 {
  float v[8];
  float operator[](int i) const { return v[i]; }
  V8& operator+=(const V8& o) {
    for (int i = 0; i < 8; ++i) v[i] += o.v[i];
    return *this;
  }
  friend V8 operator*(float a, const V8& b) {
    V8 r;
    for (int i = 0; i < 8; ++i) r.v[i] = a * b.v[i];
    return r;
  }
  friend V8 operator*(const V8& a, const V8& b) {
    V8 r;
    for (int i = 0; i < 8; ++i) r.v[i] = a.v[i] * b.v[i];
    return r;
  }
  friend V8 operator+(const V8& a, const V8& b) {
    V8 r;
    for (int i = 0; i < 8; ++i) r.v[i] = a.v[i] + b.v[i];
    return r;
  }
  friend V8 operator-(const V8& a, const V8& b) {
    V8 r;
    for (int i = 0; i < 8; ++i) r.v[i] = a.v[i] - b.v[i];
    return r;
  }
};
STREAMSPEC_INLINE V8 Max8(const V8& a, const V8& b) {
  V8 r;
  for (int i = 0; i < 8; ++i) r.v[i] = std::max(a.v[i], b.v[i]);
  return r;
}
STREAMSPEC_INLINE V8 Exp8(const V8& x) {
  V8 r;
  for (int i = 0; i < 8; ++i) r.v[i] = ExpNonPositive(x.v[i]);
  return r;
}
#endif

STREAMSPEC_INLINE V8 LoadV(const float* p) {
  V8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
STREAMSPEC_INLINE void StoreV(float* p, const V8& v) { std::memcpy(p, &v, sizeof(v)); }

// sT[j][0..16) = k_j . q for four keys; qT is the query block transposed, [hd][16].
STREAMSPEC_INLINE void MicroQK(const float* __restrict qT, int64_t hd, const float* __restrict k0,
                               const float* __restrict k1, const float* __restrict k2, const float* __restrict k3,
                               float* __restrict sT) {
  V8 a00 = {}, a01 = {}, a10 = {}, a11 = {}, a20 = {}, a21 = {}, a30 = {}, a31 = {};
  for (int64_t d = 0; d < hd; ++d) {
    const V8 q0 = LoadV(qT + d * kRows);
    const V8 q1 = LoadV(qT + d * kRows + 8);
    a00 += k0[d] * q0;
    a01 += k0[d] * q1;
    a10 += k1[d] * q0;
    a11 += k1[d] * q1;
    a20 += k2[d] * q0;
    a21 += k2[d] * q1;
    a30 += k3[d] * q0;
    a31 += k3[d] * q1;
  }
  StoreV(sT, a00);
  StoreV(sT + 8, a01);
  StoreV(sT + kRows, a10);
  StoreV(sT + kRows + 8, a11);
  StoreV(sT + 2 * kRows, a20);
  StoreV(sT + 2 * kRows + 8, a21);
  StoreV(sT + 3 * kRows, a30);
  StoreV(sT + 3 * kRows + 8, a31);
}

// acc[r][0..16) += sum_k pT[k][r] * v[k][0..16) for four rows r (acc rows hd apart,
// pT rows kRows apart, value rows v_stride apart).
STREAMSPEC_INLINE void MicroPV(const float* __restrict pT, int64_t nk, const float* __restrict v, int64_t v_stride,
                               float* __restrict acc, int64_t hd) {
  V8 a00 = LoadV(acc), a01 = LoadV(acc + 8);
  V8 a10 = LoadV(acc + hd), a11 = LoadV(acc + hd + 8);
  V8 a20 = LoadV(acc + 2 * hd), a21 = LoadV(acc + 2 * hd + 8);
  V8 a30 = LoadV(acc + 3 * hd), a31 = LoadV(acc + 3 * hd + 8);
  for (int64_t k = 0; k < nk; ++k) {
    const V8 v0 = LoadV(v + k * v_stride);
    const V8 v1 = LoadV(v + k * v_stride + 8);
    const float* p = pT + k * kRows;
    a00 += p[0] * v0;
    a01 += p[0] * v1;
    a10 += p[1] * v0;
    a11 += p[1] * v1;
    a20 += p[2] * v0;
    a21 += p[2] * v1;
    a30 += p[3] * v0;
    a31 += p[3] * v1;
  }
  StoreV(acc, a00);
  StoreV(acc + 8, a01);
  StoreV(acc + hd, a10);
  StoreV(acc + hd + 8, a11);
  StoreV(acc + 2 * hd, a20);
  StoreV(acc + 2 * hd + 8, a21);
  StoreV(acc + 3 * hd, a30);
  StoreV(acc + 3 * hd + 8, a31);
}

// ---------------------------------------------------------------------------------
// Job and tasks

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
  // float16 only: the committed cache as float, [kv head][past][hd] (keys, values).
  float* key_f32 = nullptr;
  float* value_f32 = nullptr;
  int64_t convert_chunk = 0;  // rows per conversion task
  int64_t row_blocks = 0;     // blocks of kRows virtual rows per kv head
  int64_t splits = 1;         // slices of the cache per row block
  int64_t split_len = 0;      // keys per slice (multiple of kKeyTile)
  // Split-K partial results, [task][kRows][hd + 2] (acc, m, l).
  float* partials = nullptr;
  // CSR list, per query row, of the new rows (indices into key/value) it attends to.
  std::vector<int32_t> list_offsets;
  std::vector<int32_t> list_rows;
};

// float16 pre-pass: converts a chunk of cache rows of one kv head to float.
STREAMSPEC_INLINE void ConvertTaskImpl(const Job<uint16_t>& job, size_t task) {
  const TreeAttentionShape& sh = job.shape;
  const int64_t chunks = (job.past + job.convert_chunk - 1) / job.convert_chunk;
  const int64_t kvh = static_cast<int64_t>(task) / chunks;
  const int64_t t0 = (static_cast<int64_t>(task) % chunks) * job.convert_chunk;
  const int64_t n = std::min(job.convert_chunk, job.past - t0) * sh.head_dim;
  const int64_t src = (kvh * sh.max_len + t0) * sh.head_dim;
  const int64_t dst = (kvh * job.past + t0) * sh.head_dim;
  LoadRow(job.key_f32 + dst, job.key_cache + src, n);
  LoadRow(job.value_f32 + dst, job.value_cache + src, n);
}

// Attention task: kv head, block of kRows virtual rows, slice of the cache.
template <typename T>
STREAMSPEC_INLINE void RunTaskImpl(const Job<T>& job, size_t task) {
  const TreeAttentionShape& sh = job.shape;
  const int64_t hd = sh.head_dim;
  const int64_t group = sh.num_heads / sh.kv_num_heads;
  const int64_t split = static_cast<int64_t>(task) % job.splits;
  const int64_t block = (static_cast<int64_t>(task) / job.splits) % job.row_blocks;
  const int64_t kvh = static_cast<int64_t>(task) / job.splits / job.row_blocks;
  const int64_t v0 = block * kRows;
  const int64_t rows = std::min(kRows, group * sh.seq - v0);
  const int64_t rows4 = (rows + 3) / 4 * 4;
  const int64_t q_stride = sh.num_heads * hd;
  const int64_t kv_stride = sh.kv_num_heads * hd;
  const int64_t hd16 = hd / 16 * 16;

  // Scratch: q[kRows][hd], qT[hd][kRows], acc[kRows][hd], sT[kKeyTile][kRows], and
  // two rows for the new keys.
  thread_local std::vector<float> scratch;
  const size_t need = static_cast<size_t>(3 * kRows * hd + kKeyTile * kRows + 2 * hd);
  if (scratch.size() < need) scratch.resize(need);
  float* q = scratch.data();
  float* qT = q + kRows * hd;
  float* acc = qT + kRows * hd;
  float* sT = acc + kRows * hd;
  float* k_row = sT + kKeyTile * kRows;
  float* v_row = k_row + hd;

  int64_t row_of[kRows];
  int64_t head_of[kRows];
  alignas(32) float m[kRows];
  alignas(32) float l[kRows];
  for (int64_t i = 0; i < kRows; ++i) {
    float* qi = q + i * hd;
    std::fill(acc + i * hd, acc + (i + 1) * hd, 0.f);
    m[i] = -1e30f;
    l[i] = 0.f;
    if (i >= rows) {  // padding lanes
      std::fill(qi, qi + hd, 0.f);
    } else {
      head_of[i] = kvh * group + (v0 + i) / sh.seq;
      row_of[i] = (v0 + i) % sh.seq;
      LoadRow(qi, job.query + row_of[i] * q_stride + head_of[i] * hd, hd);
      Scale(qi, sh.scale, hd);
    }
    for (int64_t d = 0; d < hd; ++d) qT[d * kRows + i] = qi[d];
  }

  // 1. The committed cache, keys [lo, hi) of this task's slice.
  const int64_t lo = split * job.split_len;
  const int64_t hi = std::min(job.past, lo + job.split_len);
  const float* kc;
  const float* vc;
  if constexpr (std::is_same<T, float>::value) {
    kc = job.key_cache + kvh * sh.max_len * hd;
    vc = job.value_cache + kvh * sh.max_len * hd;
  } else {
    kc = job.key_f32 + kvh * job.past * hd;
    vc = job.value_f32 + kvh * job.past * hd;
  }
  for (int64_t t0 = lo; t0 < hi; t0 += kKeyTile) {
    const int64_t nk = std::min(kKeyTile, hi - t0);
    const float* kt = kc + t0 * hd;
    for (int64_t k = 0; k < nk; k += 4) {
      // The last group may reach past nk: repeat a valid row, the scores are unused.
      const float* k0 = kt + k * hd;
      const float* k1 = kt + std::min(k + 1, nk - 1) * hd;
      const float* k2 = kt + std::min(k + 2, nk - 1) * hd;
      const float* k3 = kt + std::min(k + 3, nk - 1) * hd;
      MicroQK(qT, hd, k0, k1, k2, k3, sT + k * kRows);
    }
    // Online softmax, vectorised across the 16 rows.
    for (int64_t h = 0; h < kRows; h += 8) {
      const V8 m_old = LoadV(m + h);
      V8 m_new = m_old;
      for (int64_t k = 0; k < nk; ++k) m_new = Max8(m_new, LoadV(sT + k * kRows + h));
      V8 sum = {};
      for (int64_t k = 0; k < nk; ++k) {
        const V8 p = Exp8(LoadV(sT + k * kRows + h) - m_new);
        StoreV(sT + k * kRows + h, p);
        sum += p;
      }
      const V8 corr = Exp8(m_old - m_new);
      StoreV(l + h, LoadV(l + h) * corr + sum);
      StoreV(m + h, m_new);
      for (int64_t i = 0; i < 8 && h + i < rows4; ++i) Scale(acc + (h + i) * hd, corr[i], hd);
    }
    const float* vt = vc + t0 * hd;
    for (int64_t rb = 0; rb < rows4; rb += 4) {
      for (int64_t d0 = 0; d0 < hd16; d0 += 16) MicroPV(sT + rb, nk, vt + d0, hd, acc + rb * hd + d0, hd);
      for (int64_t r = rb; r < rb + 4 && hd16 < hd; ++r) {  // leftover dims
        for (int64_t k = 0; k < nk; ++k) Axpy(acc + r * hd + hd16, sT[k * kRows + r], vt + k * hd + hd16, hd - hd16);
      }
    }
  }

  // 2. (first slice only) each row's own new keys: its tree path, and the lower
  // streams of the same node.  Scores first, then one softmax update per row.
  if (split == 0) {
    float* s = sT;  // reused: up to kKeyTile * kRows scores per batch
    const int64_t batch = kKeyTile * kRows;
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t r = row_of[i];
      const float* qi = q + i * hd;
      float* ai = acc + i * hd;
      for (int64_t e0 = job.list_offsets[r]; e0 < job.list_offsets[r + 1]; e0 += batch) {
        const int64_t ne = std::min<int64_t>(batch, job.list_offsets[r + 1] - e0);
        float mx = m[i];
        for (int64_t e = 0; e < ne; ++e) {
          const int64_t src = job.list_rows[e0 + e];
          const T* krow = job.key + src * kv_stride + kvh * hd;
          if constexpr (std::is_same<T, float>::value) {
            s[e] = Dot(qi, krow, hd);
          } else {
            LoadRow(k_row, krow, hd);
            s[e] = Dot(qi, k_row, hd);
          }
          mx = std::max(mx, s[e]);
        }
        const float corr = ExpNonPositive(m[i] - mx);
        float sum = 0.f;
        for (int64_t e = 0; e < ne; ++e) {
          s[e] = ExpNonPositive(s[e] - mx);
          sum += s[e];
        }
        l[i] = l[i] * corr + sum;
        m[i] = mx;
        Scale(ai, corr, hd);
        for (int64_t e = 0; e < ne; ++e) {
          const T* vrow = job.value + job.list_rows[e0 + e] * kv_stride + kvh * hd;
          if constexpr (std::is_same<T, float>::value) {
            Axpy(ai, s[e], vrow, hd);
          } else {
            LoadRow(v_row, vrow, hd);
            Axpy(ai, s[e], v_row, hd);
          }
        }
      }
    }
  }

  // 3. Output, or a partial result for the merge.
  if (job.splits == 1) {
    for (int64_t i = 0; i < rows; ++i) {
      StoreRow(job.output + row_of[i] * q_stride + head_of[i] * hd, acc + i * hd, 1.0f / l[i], hd);
    }
  } else {
    float* part = job.partials + static_cast<int64_t>(task) * kRows * (hd + 2);
    for (int64_t i = 0; i < rows; ++i) {
      std::memcpy(part + i * (hd + 2), acc + i * hd, static_cast<size_t>(hd) * sizeof(float));
      part[i * (hd + 2) + hd] = m[i];
      part[i * (hd + 2) + hd + 1] = l[i];
    }
  }
}

// Merge task (split-K): kv head and row block; combines the slices' partial results.
template <typename T>
STREAMSPEC_INLINE void MergeTaskImpl(const Job<T>& job, size_t task) {
  const TreeAttentionShape& sh = job.shape;
  const int64_t hd = sh.head_dim;
  const int64_t group = sh.num_heads / sh.kv_num_heads;
  const int64_t block = static_cast<int64_t>(task) % job.row_blocks;
  const int64_t kvh = static_cast<int64_t>(task) / job.row_blocks;
  const int64_t v0 = block * kRows;
  const int64_t rows = std::min(kRows, group * sh.seq - v0);
  const int64_t stride = kRows * (hd + 2);
  const float* first = job.partials + static_cast<int64_t>(task) * job.splits * stride;
  thread_local std::vector<float> out;
  if (out.size() < static_cast<size_t>(hd)) out.resize(static_cast<size_t>(hd));
  for (int64_t i = 0; i < rows; ++i) {
    float mx = -1e30f;
    for (int64_t s = 0; s < job.splits; ++s) mx = std::max(mx, first[s * stride + i * (hd + 2) + hd]);
    float denom = 0.f;
    std::fill(out.begin(), out.begin() + hd, 0.f);
    for (int64_t s = 0; s < job.splits; ++s) {
      const float* p = first + s * stride + i * (hd + 2);
      const float w = ExpNonPositive(p[hd] - mx);
      denom += w * p[hd + 1];
      Axpy(out.data(), w, p, hd);
    }
    const int64_t head = kvh * group + (v0 + i) / sh.seq;
    const int64_t row = (v0 + i) % sh.seq;
    StoreRow(job.output + row * sh.num_heads * hd + head * hd, out.data(), 1.0f / denom, hd);
  }
}

// Non-template entry points, so that the x86-64 clones apply to whole tasks.
STREAMSPEC_HOT void RunTask(const Job<float>& job, size_t task) { RunTaskImpl<float>(job, task); }
STREAMSPEC_HOT void RunTask(const Job<uint16_t>& job, size_t task) { RunTaskImpl<uint16_t>(job, task); }
STREAMSPEC_HOT void MergeTask(const Job<float>& job, size_t task) { MergeTaskImpl<float>(job, task); }
STREAMSPEC_HOT void MergeTask(const Job<uint16_t>& job, size_t task) { MergeTaskImpl<uint16_t>(job, task); }
STREAMSPEC_HOT void ConvertTask(const Job<uint16_t>& job, size_t task) { ConvertTaskImpl(job, task); }

template <typename T>
void RunThunk(void* data, size_t task) {
  RunTask(*static_cast<const Job<T>*>(data), task);
}
template <typename T>
void MergeThunk(void* data, size_t task) {
  MergeTask(*static_cast<const Job<T>*>(data), task);
}
void ConvertThunk(void* data, size_t task) { ConvertTask(*static_cast<const Job<uint16_t>*>(data), task); }

void ParallelRun(ParallelForFn parallel_for, void* runner, void (*fn)(void*, size_t), size_t total, void* job) {
  if (parallel_for != nullptr && total > 1) {
    parallel_for(runner, fn, total, job);
  } else {
    for (size_t t = 0; t < total; ++t) fn(job, t);
  }
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

  // Tasks: kv heads x row blocks, times cache slices when that is too few.
  const int64_t group = sh.num_heads / sh.kv_num_heads;
  job.row_blocks = (group * sh.seq + kRows - 1) / kRows;
  const int64_t base = sh.kv_num_heads * job.row_blocks;
  int64_t splits = 1;
  if (base < kMinTasks) splits = std::min((kMinTasks + base - 1) / base, past / (4 * kKeyTile));
  splits = std::max<int64_t>(splits, 1);
  job.split_len = std::max<int64_t>((past + splits - 1) / splits + kKeyTile - 1, kKeyTile) / kKeyTile * kKeyTile;
  job.splits = std::max<int64_t>((past + job.split_len - 1) / job.split_len, 1);

  // Buffers kept by the calling thread between calls: float16 cache as float, and the
  // split-K partial results.
  thread_local std::vector<float> buffer;
  const size_t cache_f32 = std::is_same<T, float>::value ? 0 : static_cast<size_t>(2 * sh.kv_num_heads * past * hd);
  const size_t partial = job.splits > 1 ? static_cast<size_t>(base * job.splits * kRows * (hd + 2)) : 0;
  if (buffer.size() < cache_f32 + partial) buffer.resize(cache_f32 + partial);
  if (cache_f32) {
    job.key_f32 = buffer.data();
    job.value_f32 = buffer.data() + cache_f32 / 2;
  }
  job.partials = buffer.data() + cache_f32;

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

  if constexpr (!std::is_same<T, float>::value) {
    if (past > 0) {
      job.convert_chunk = 4 * kKeyTile;
      const int64_t chunks = (past + job.convert_chunk - 1) / job.convert_chunk;
      ParallelRun(parallel_for, runner, &ConvertThunk, static_cast<size_t>(sh.kv_num_heads * chunks), &job);
    }
  }
  ParallelRun(parallel_for, runner, &RunThunk<T>, static_cast<size_t>(base * job.splits), &job);
  if (job.splits > 1) ParallelRun(parallel_for, runner, &MergeThunk<T>, static_cast<size_t>(base), &job);
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
