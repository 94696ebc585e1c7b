// TreeAttention CPU kernel (no ONNX Runtime dependency; see tree_attention.h).
//
// Work split.  A "virtual row" is a (query head, query row) pair; the heads of one kv
// group share every key and value, so virtual rows are handled in blocks of kRows = 16,
// and a task takes a kv head, a group of up to eight blocks and - when that leaves
// too few tasks for the threads - a slice of the committed cache (split-K, merged
// afterwards).  Tasks run on the caller's parallel-for (ORT's intra-op thread pool).
//
// Inside a task the committed cache is the outer loop, in tiles of kKeyTile keys, so a
// tile is read from memory once for the whole group.  Per block the scores are kept
// transposed, [key][16 rows]: the rows are the vector lanes, so the score product reads
// the cache rows as they lie (no transposition), the online softmax is vectorised
// across rows, and the value product is a register-blocked rows x 16 dims update.
// Afterwards every row visits its own short list of new keys (its tree path, and for
// stream rows the lower streams of the same node).  Float32 accumulation throughout;
// float16 caches are converted once per call in a parallel pre-pass.
//
// The vector code uses GCC/Clang vector extensions in the CPU's native width (see
// Isa); on x86-64 the attention task is compiled for AVX-512, AVX2 + FMA and SSE2 and
// picked at run time, so one library serves every x86-64 CPU.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <type_traits>
#include <vector>

#include "tree_attention.h"

#if !defined(__GNUC__)
#error "The TreeAttention CPU kernel needs GCC or Clang (vector extensions)."
#endif

#if defined(__GNUC__) && !defined(__clang__)
// The vector helpers below are always inlined; the ABI note about returning AVX vectors
// from non-AVX functions does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace streamspec {
namespace {

constexpr int64_t kRows = 16;     // virtual rows per block = one 16-float vector
constexpr int64_t kKeyTile = 64;  // keys per softmax step
constexpr int64_t kMaxGroupBlocks = 8;  // row blocks per task (128 rows: ~100 KB of state)

// Tasks worth creating: enough for every hardware thread to get a couple.
int64_t MinTasks() {
  static const int64_t tasks = std::max<int64_t>(8, 2 * static_cast<int64_t>(std::thread::hardware_concurrency()));
  return tasks;
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(STREAMSPEC_NO_CLONES)
#define STREAMSPEC_HOT __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define STREAMSPEC_HOT
#endif

#define STREAMSPEC_INLINE inline __attribute__((always_inline))

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
// Vectors.  A block's kRows = 16 lanes (rows in the score and softmax code, head
// dimensions in the value product) are held as 16 / W native vectors of W floats.
// The kernels are templates on an instruction-set description, instantiated once per
// instruction set and picked at run time (x86-64: AVX-512, AVX2 + FMA or SSE2; other
// CPUs: 128-bit vectors, NEON on Jetson).  Native widths matter: a vector wider than
// the registers is kept in memory by the compiler and runs ~10x slower.

// W floats per vector; kKeys keys per score micro-kernel and kPvRows rows per value
// micro-kernel, sized so that their accumulators fill but do not overflow the registers.
template <int kWidth, int kQkKeys, int kPvRowCount>
struct Isa {
  static constexpr int W = kWidth;
  static constexpr int kVecs = kRows / kWidth;  // vectors per 16 lanes
  static constexpr int kKeys = kQkKeys;
  static constexpr int kPvRows = kPvRowCount;
  typedef float V __attribute__((vector_size(4 * kWidth)));
  typedef int32_t Vi __attribute__((vector_size(4 * kWidth)));
};
using IsaAvx512 = Isa<16, 8, 8>;  // 32 zmm registers: 8 + 8 accumulators
using IsaAvx2 = Isa<8, 4, 4>;     // 16 ymm registers: 4 x 2 accumulators
#if defined(__aarch64__)
using IsaBase = Isa<4, 4, 4>;     // NEON, 32 q registers: 4 x 4 accumulators
#else
using IsaBase = Isa<4, 2, 2>;     // SSE2 (or any 128-bit vectors), 16 registers
#endif

template <class I>
STREAMSPEC_INLINE typename I::V LoadV(const float* p) {
  typename I::V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <class I>
STREAMSPEC_INLINE void StoreV(float* p, const typename I::V& v) {
  std::memcpy(p, &v, sizeof(v));
}
template <class I>
STREAMSPEC_INLINE typename I::V Max(const typename I::V& a, const typename I::V& b) {
  return a > b ? a : b;
}
template <class I>
STREAMSPEC_INLINE typename I::V Exp(const typename I::V& arg) {  // vector ExpNonPositive
  using V = typename I::V;
  const V lo = V{} + kExpMin;
  const V x = arg < lo ? lo : arg;
  const V n = (x * kLog2e + kRound) - kRound;
  const V r = (x - n * kLn2Hi) - n * kLn2Lo;
  V p = V{} + 1.984126984126984e-04f;
  p = p * r + 1.388888888888889e-03f;
  p = p * r + 8.333333333333333e-03f;
  p = p * r + 4.166666666666667e-02f;
  p = p * r + 1.666666666666667e-01f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const typename I::Vi bits = (__builtin_convertvector(n, typename I::Vi) + 127) << 23;
  V scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// sT[j][0..16) = k_j . q for kKeys keys k_j = keys + j * hd; qT is the block's queries
// transposed, [hd][16].  Products are written scalar * vector: a broadcast multiply-add.
template <class I, int kKeys>
STREAMSPEC_INLINE void MicroQK(const float* __restrict qT, int64_t hd, const float* __restrict keys,
                               float* __restrict sT) {
  typename I::V a[kKeys][I::kVecs] = {};
  for (int64_t d = 0; d < hd; ++d) {
    typename I::V q[I::kVecs];
    for (int h = 0; h < I::kVecs; ++h) q[h] = LoadV<I>(qT + d * kRows + h * I::W);
#pragma GCC unroll 16
    for (int j = 0; j < kKeys; ++j) {
      const float k = keys[j * hd + d];
#pragma GCC unroll 4
      for (int h = 0; h < I::kVecs; ++h) a[j][h] += k * q[h];
    }
  }
  for (int j = 0; j < kKeys; ++j) {
    for (int h = 0; h < I::kVecs; ++h) StoreV<I>(sT + j * kRows + h * I::W, a[j][h]);
  }
}

// acc[r][0..16) += sum_k pT[k][r] * v[k][0..16) for kPvRows rows r (acc rows hd apart,
// pT rows kRows apart, value rows hd apart).
template <class I>
STREAMSPEC_INLINE void MicroPV(const float* __restrict pT, int64_t nk, const float* __restrict v,
                               float* __restrict acc, int64_t hd) {
  typename I::V a[I::kPvRows][I::kVecs];
  for (int r = 0; r < I::kPvRows; ++r) {
    for (int h = 0; h < I::kVecs; ++h) a[r][h] = LoadV<I>(acc + r * hd + h * I::W);
  }
  for (int64_t k = 0; k < nk; ++k) {
    typename I::V vk[I::kVecs];
    for (int h = 0; h < I::kVecs; ++h) vk[h] = LoadV<I>(v + k * hd + h * I::W);
    const float* p = pT + k * kRows;
#pragma GCC unroll 16
    for (int r = 0; r < I::kPvRows; ++r) {
#pragma GCC unroll 4
      for (int h = 0; h < I::kVecs; ++h) a[r][h] += p[r] * vk[h];
    }
  }
  for (int r = 0; r < I::kPvRows; ++r) {
    for (int h = 0; h < I::kVecs; ++h) StoreV<I>(acc + r * hd + h * I::W, a[r][h]);
  }
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
  int64_t group_blocks = 0;   // row blocks per task (they share each cache tile)
  int64_t groups = 0;         // groups of row blocks per kv head
  int64_t splits = 1;         // slices of the cache per group
  int64_t split_len = 0;      // keys per slice (multiple of kKeyTile)
  // Split-K partial results, [kv head][row block][slice][kRows][hd + 2] (acc, m, l).
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

// One block of kRows virtual rows (query head, query row) of a kv group, with its
// running softmax state.  All arrays live in the task's scratch.
struct Block {
  int64_t rows = 0;  // real rows (the rest are zero padding lanes)
  int64_t row_of[kRows];
  int64_t head_of[kRows];
  float* q;    // [kRows][hd], scaled
  float* qT;   // [hd][kRows]
  float* acc;  // [kRows][hd], unnormalised output
  float* m;    // [kRows] running maximum
  float* l;    // [kRows] running sum
};

template <typename T>
STREAMSPEC_INLINE void InitBlock(const Job<T>& job, int64_t kvh, int64_t block, float* scratch, Block& b) {
  const TreeAttentionShape& sh = job.shape;
  const int64_t hd = sh.head_dim;
  const int64_t group = sh.num_heads / sh.kv_num_heads;
  const int64_t v0 = block * kRows;
  b.rows = std::min(kRows, group * sh.seq - v0);
  b.q = scratch;
  b.qT = b.q + kRows * hd;
  b.acc = b.qT + kRows * hd;
  b.m = b.acc + kRows * hd;
  b.l = b.m + kRows;
  std::fill(b.acc, b.acc + kRows * hd, 0.f);
  std::fill(b.m, b.m + kRows, -1e30f);
  std::fill(b.l, b.l + kRows, 0.f);
  for (int64_t i = 0; i < kRows; ++i) {
    float* qi = b.q + i * hd;
    if (i >= b.rows) {  // padding lanes
      std::fill(qi, qi + hd, 0.f);
    } else {
      b.head_of[i] = kvh * group + (v0 + i) / sh.seq;
      b.row_of[i] = (v0 + i) % sh.seq;
      LoadRow(qi, job.query + b.row_of[i] * sh.num_heads * hd + b.head_of[i] * hd, hd);
      Scale(qi, sh.scale, hd);
    }
    for (int64_t d = 0; d < hd; ++d) b.qT[d * kRows + i] = qi[d];
  }
}
constexpr int64_t BlockFloats(int64_t hd) { return 3 * kRows * hd + 2 * kRows; }

// One tile of nk committed keys kt / values vt ([nk][hd] each) for one block: scores
// (into sT, [kKeyTile][kRows]), online softmax across the 16 rows, value product.
template <class I>
STREAMSPEC_INLINE void CacheTile(Block& b, const float* __restrict kt, const float* __restrict vt, int64_t nk,
                                 int64_t hd, float* __restrict sT) {
  using V = typename I::V;
  int64_t k = 0;
  for (; k + I::kKeys <= nk; k += I::kKeys) MicroQK<I, I::kKeys>(b.qT, hd, kt + k * hd, sT + k * kRows);
  for (; k < nk; ++k) MicroQK<I, 1>(b.qT, hd, kt + k * hd, sT + k * kRows);
  alignas(64) float corr[kRows];
  for (int64_t h = 0; h < kRows; h += I::W) {
    const V m_old = LoadV<I>(b.m + h);
    V m_new = m_old;
    for (k = 0; k < nk; ++k) m_new = Max<I>(m_new, LoadV<I>(sT + k * kRows + h));
    V sum = {};
    for (k = 0; k < nk; ++k) {
      const V p = Exp<I>(LoadV<I>(sT + k * kRows + h) - m_new);
      StoreV<I>(sT + k * kRows + h, p);
      sum += p;
    }
    const V c = Exp<I>(m_old - m_new);
    StoreV<I>(b.l + h, LoadV<I>(b.l + h) * c + sum);
    StoreV<I>(b.m + h, m_new);
    StoreV<I>(corr + h, c);
  }
  // Rows up to a multiple of the value kernel's (padding rows are zero queries: finite).
  const int64_t rows = (b.rows + I::kPvRows - 1) / I::kPvRows * I::kPvRows;
  for (int64_t i = 0; i < rows; ++i) Scale(b.acc + i * hd, corr[i], hd);
  const int64_t hd16 = hd / 16 * 16;
  for (int64_t rb = 0; rb < rows; rb += I::kPvRows) {
    for (int64_t d0 = 0; d0 < hd16; d0 += 16) MicroPV<I>(sT + rb, nk, vt + d0, b.acc + rb * hd + d0, hd);
    for (int64_t r = rb; r < rb + I::kPvRows && hd16 < hd; ++r) {  // leftover dims
      for (k = 0; k < nk; ++k) Axpy(b.acc + r * hd + hd16, sT[k * kRows + r], vt + k * hd + hd16, hd - hd16);
    }
  }
}

// Each row of the block visits its own new keys: its tree path, and for stream rows
// the lower streams of the same node.  Scores first, then one softmax update per row.
template <typename T>
STREAMSPEC_INLINE void NewKeys(const Job<T>& job, int64_t kvh, Block& b, float* __restrict s, float* k_row,
                               float* v_row) {
  const int64_t hd = job.shape.head_dim;
  const int64_t kv_stride = job.shape.kv_num_heads * hd;
  const int64_t batch = kKeyTile * kRows;  // s holds this many scores
  for (int64_t i = 0; i < b.rows; ++i) {
    const int64_t r = b.row_of[i];
    const float* qi = b.q + i * hd;
    float* ai = b.acc + i * hd;
    for (int64_t e0 = job.list_offsets[r]; e0 < job.list_offsets[r + 1]; e0 += batch) {
      const int64_t ne = std::min<int64_t>(batch, job.list_offsets[r + 1] - e0);
      float mx = b.m[i];
      for (int64_t e = 0; e < ne; ++e) {
        const T* krow = job.key + job.list_rows[e0 + e] * kv_stride + kvh * hd;
        if constexpr (std::is_same<T, float>::value) {
          s[e] = Dot(qi, krow, hd);
        } else {
          LoadRow(k_row, krow, hd);
          s[e] = Dot(qi, k_row, hd);
        }
        mx = std::max(mx, s[e]);
      }
      const float corr = ExpNonPositive(b.m[i] - mx);
      float sum = 0.f;
      for (int64_t e = 0; e < ne; ++e) {
        s[e] = ExpNonPositive(s[e] - mx);
        sum += s[e];
      }
      b.l[i] = b.l[i] * corr + sum;
      b.m[i] = mx;
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

// Attention task: kv head, group of row blocks, slice of the cache.  The cache is the
// outer loop, so each tile of keys and values is read once for the whole group while
// it sits in the L1 cache.
template <typename T, class I>
STREAMSPEC_INLINE void RunTaskImpl(const Job<T>& job, size_t task) {
  const TreeAttentionShape& sh = job.shape;
  const int64_t hd = sh.head_dim;
  const int64_t split = static_cast<int64_t>(task) % job.splits;
  const int64_t grp = (static_cast<int64_t>(task) / job.splits) % job.groups;
  const int64_t kvh = static_cast<int64_t>(task) / job.splits / job.groups;
  const int64_t first = grp * job.group_blocks;
  const int64_t nb = std::min(job.group_blocks, job.row_blocks - first);

  // Scratch: the blocks, sT[kKeyTile][kRows] and two rows for float16 new keys.
  thread_local std::vector<float> scratch;
  thread_local std::vector<Block> blocks;
  const size_t need = static_cast<size_t>(nb * BlockFloats(hd) + kKeyTile * kRows + 2 * hd);
  if (scratch.size() < need) scratch.resize(need);
  if (blocks.size() < static_cast<size_t>(nb)) blocks.resize(static_cast<size_t>(nb));
  float* sT = scratch.data() + nb * BlockFloats(hd);
  float* k_row = sT + kKeyTile * kRows;
  float* v_row = k_row + hd;
  for (int64_t b = 0; b < nb; ++b) InitBlock(job, kvh, first + b, scratch.data() + b * BlockFloats(hd), blocks[b]);

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
    for (int64_t b = 0; b < nb; ++b) CacheTile<I>(blocks[b], kc + t0 * hd, vc + t0 * hd, nk, hd, sT);
  }

  for (int64_t b = 0; b < nb; ++b) {
    Block& blk = blocks[b];
    // 2. (first slice only) the new keys.
    if (split == 0) NewKeys(job, kvh, blk, sT, k_row, v_row);
    // 3. Output, or a partial result for the merge.
    if (job.splits == 1) {
      for (int64_t i = 0; i < blk.rows; ++i) {
        StoreRow(job.output + blk.row_of[i] * sh.num_heads * hd + blk.head_of[i] * hd, blk.acc + i * hd,
                 1.0f / blk.l[i], hd);
      }
    } else {
      const int64_t slot = (kvh * job.row_blocks + first + b) * job.splits + split;
      float* part = job.partials + slot * kRows * (hd + 2);
      for (int64_t i = 0; i < blk.rows; ++i) {
        std::memcpy(part + i * (hd + 2), blk.acc + i * hd, static_cast<size_t>(hd) * sizeof(float));
        part[i * (hd + 2) + hd] = blk.m[i];
        part[i * (hd + 2) + hd + 1] = blk.l[i];
      }
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

// Entry points.  The attention task exists once per instruction set (see Isa) and is
// picked per call by RunThunkFor; merge and conversion are short scalar loops, left to
// the compiler's clones.
template <typename T, class I>
STREAMSPEC_INLINE void RunTaskAs(void* data, size_t task) {
  RunTaskImpl<T, I>(*static_cast<const Job<T>*>(data), task);
}
template <typename T>
void RunBase(void* data, size_t task) { RunTaskAs<T, IsaBase>(data, task); }
#if defined(__x86_64__)
template <typename T>
__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma"))) void RunAvx512(void* data, size_t task) {
  RunTaskAs<T, IsaAvx512>(data, task);
}
template <typename T>
__attribute__((target("avx2,fma"))) void RunAvx2(void* data, size_t task) { RunTaskAs<T, IsaAvx2>(data, task); }
#endif

// The best kernel this CPU runs; the environment variable STREAMSPEC_CPU_KERNEL=avx2|base
// selects a lower one (tests check every kernel on one machine).  nullptr for any other
// value of the variable: a typo must not silently time or test the wrong kernel.
template <typename T>
void (*RunThunkFor())(void*, size_t) {
  const char* wanted = std::getenv("STREAMSPEC_CPU_KERNEL");
  if (wanted != nullptr && *wanted != '\0' && std::strcmp(wanted, "avx2") != 0 && std::strcmp(wanted, "base") != 0) {
    return nullptr;
  }
#if defined(__x86_64__)
  static const int level = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")) {
      return 2;
    }
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 1 : 0;
  }();
  int use = level;
  if (wanted != nullptr && std::strcmp(wanted, "avx2") == 0) use = std::min(level, 1);
  if (wanted != nullptr && std::strcmp(wanted, "base") == 0) use = 0;
  if (use == 2) return &RunAvx512<T>;
  if (use == 1) return &RunAvx2<T>;
#endif
  return &RunBase<T>;
}

STREAMSPEC_HOT void MergeTask(const Job<float>& job, size_t task) { MergeTaskImpl<float>(job, task); }
STREAMSPEC_HOT void MergeTask(const Job<uint16_t>& job, size_t task) { MergeTaskImpl<uint16_t>(job, task); }
STREAMSPEC_HOT void ConvertTask(const Job<uint16_t>& job, size_t task) { ConvertTaskImpl(job, task); }

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
  // Checked before anything is written.
  void (*run_task)(void*, size_t) = RunThunkFor<T>();
  if (run_task == nullptr) return "TreeAttention: STREAMSPEC_CPU_KERNEL must be avx2, base or unset";
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

  // Tasks: kv heads x groups of row blocks x slices of the cache.  Large groups read
  // each cache tile once for many rows; when that leaves fewer tasks than the threads
  // can use, the cache is split first (split-K, merged afterwards), then the groups.
  const int64_t group = sh.num_heads / sh.kv_num_heads;
  const int64_t min_tasks = MinTasks();
  job.row_blocks = (group * sh.seq + kRows - 1) / kRows;
  int64_t groups = (job.row_blocks + kMaxGroupBlocks - 1) / kMaxGroupBlocks;
  int64_t splits = 1;
  if (sh.kv_num_heads * groups < min_tasks) {
    const int64_t want = (min_tasks + sh.kv_num_heads * groups - 1) / (sh.kv_num_heads * groups);
    splits = std::max<int64_t>(std::min(want, past / (4 * kKeyTile)), 1);
    if (sh.kv_num_heads * groups * splits < min_tasks) {
      groups = std::min(job.row_blocks, (min_tasks + sh.kv_num_heads * splits - 1) / (sh.kv_num_heads * splits));
    }
  }
  job.group_blocks = (job.row_blocks + groups - 1) / groups;
  job.groups = (job.row_blocks + job.group_blocks - 1) / job.group_blocks;
  job.split_len = std::max<int64_t>((past + splits - 1) / splits + kKeyTile - 1, kKeyTile) / kKeyTile * kKeyTile;
  job.splits = std::max<int64_t>((past + job.split_len - 1) / job.split_len, 1);
  const int64_t base = sh.kv_num_heads * job.row_blocks;  // merge tasks

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
  ParallelRun(parallel_for, runner, run_task, static_cast<size_t>(sh.kv_num_heads * job.groups * job.splits), &job);
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
