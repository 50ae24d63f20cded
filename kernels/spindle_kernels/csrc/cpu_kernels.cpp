// Spindle's C++ CPU kernels: paged attention, RMSNorm (+ residual), rotary, SiLU-and-mul, KV cache write, and
// the greedy token with its row's log-normalizer, and matmuls of one to four rows (and, with AMX, up to 32).
//
// Attention reads straight from the paged KV cache, one query row at a time: a decode row per sequence, or
// the rows of a prefill chunk, each over the context up to its own position (`attention_rows`). The torch
// path (cpu.py) gathers every sequence's blocks into a contiguous copy first: at long contexts that copy is
// most of the work. Here a sequence's rows are walked once for the scores and once for the values, in
// float32 (bf16 widened on the fly; where the CPU has AVX512-BF16, bf16 scores are sums of exact bf16 products
// and the softmax weights are rounded to bf16 before they meet V, as torch's own CPU flash attention and
// transformers' eager attention round them), each KV head's query heads (GQA group) sharing every K/V row
// they read.
// Work is split over torch's own intra-op thread pool (at::parallel_for; the build has -fopenmp, else that
// header template runs serially), so no second OpenMP pool competes with the GEMMs.
//
// Built on first use by spindle_kernels/cpu_native.py for the host CPU (-march=native) and registered as
// torch.ops.spindle_cpu.{paged_decode_attention, attention_rows, rms_norm, rotary_embedding, silu_and_mul,
// reshape_and_cache, argmax_logsumexp, linear_rows, linear_tiles, has_linear_tiles}.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

inline float to_float(float x) { return x; }

// bf16 travels as its raw bits (uint16_t): loads of the c10::BFloat16 struct kept loops from vectorizing.
using bf16 = uint16_t;

inline float to_float(bf16 x) {
  uint32_t bits = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline void from_float(float x, float* out) { *out = x; }

// Round to nearest even, NaN kept NaN: c10::BFloat16's own conversion, in arithmetic the compiler vectorizes.
inline uint16_t bf16_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return (u & 0x7fffffffu) > 0x7f800000u ? uint16_t(0x7fc0) : static_cast<uint16_t>(rounded);
}

inline void from_float(float x, bf16* out) { *out = bf16_bits(x); }

// exp for the softmax, in plain arithmetic so the compiler vectorizes it (std::exp stays a scalar call,
// which was most of the kernel's time at long contexts): exp(x) = 2^n * exp(r), |r| <= ln2/2, with a
// degree-6 Taylor polynomial (relative error ~2e-7), for x in [-87, 87]. exp_reduced is the part that serves
// a float and a 16-lane vector alike (exp16 below): n = round(x / ln2) by the 1.5 * 2^23 trick (std::floor
// kept these loops scalar), and the polynomial in r.
template <typename F>
inline F exp_reduced(F x, F* n_out) {
  const F n = (x * 1.44269504f + 12582912.0f) - 12582912.0f;
  const F r = x - n * 0.693359375f + n * 2.12194440e-4f;
  F p = F{} + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  *n_out = n;
  return p * r + 1.0f;
}

inline float softmax_exp(float x) {
  x = x < -87.0f ? -87.0f : (x > 87.0f ? 87.0f : x);
  float n;
  const float p = exp_reduced(x, &n);
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// head_dim is a template constant: with a runtime length every inner loop (8 per cached token) paid
// the vectorizer's prologue and remainder code, several times the arithmetic itself.
inline bf16* BF(const at::Tensor& t) { return reinterpret_cast<bf16*>(t.data_ptr<c10::BFloat16>()); }

// ---- 16-lane float vectors (GCC vector extensions: one zmm with AVX-512, two ymm with AVX2) ----
typedef float vf16 __attribute__((vector_size(64)));
typedef float vf16_u __attribute__((vector_size(64), aligned(4)));
typedef uint16_t vh16_u __attribute__((vector_size(32), aligned(2)));
typedef uint32_t vu16 __attribute__((vector_size(64)));
typedef int32_t vi16 __attribute__((vector_size(64)));

inline vf16 load16(const float* p) { return *reinterpret_cast<const vf16_u*>(p); }
// 16 bf16 zero-extended to 32-bit lanes. With AVX-512 one VPMOVZXWD: GCC 12 lowers the generic conversion to
// two half-width ones and an insert (bf16 silu_and_mul spent a third of its instructions there).
inline vu16 widen16(const bf16* p) {
#if defined(__AVX512F__)
  return (vu16)_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#else
  return __builtin_convertvector(*reinterpret_cast<const vh16_u*>(p), vu16);
#endif
}
inline vf16 load16(const bf16* p) {  // bf16 -> float32 is a 16-bit shift of the bits
  const vu16 wide = widen16(p) << 16;
  return reinterpret_cast<const vf16&>(wide);
}
inline void store16(float* p, vf16 v) { *reinterpret_cast<vf16_u*>(p) = v; }

// ---- bf16 pairs (two bf16 in each 32-bit lane) ----
typedef uint32_t vu16_u __attribute__((vector_size(64), aligned(2)));
inline vu16 load_pairs(const bf16* p) { return *reinterpret_cast<const vu16_u*>(p); }

#if defined(__AVX512BF16__)
// VDPBF16PS: per lane acc + a.lo * b.lo + a.hi * b.hi, the bf16 products exact in float32: one instruction
// where widening both sides takes four and two FMAs.
constexpr bool kDotPairs = true;
inline vf16 dot_pairs(vf16 acc, vu16 a, vu16 b) {
  return (vf16)_mm512_dpbf16_ps((__m512)acc, (__m512bh)a, (__m512bh)b);
}
#else
constexpr bool kDotPairs = false;
inline vf16 dot_pairs(vf16 acc, vu16 a, vu16 b) {  // the same sum, widened (compiled, never chosen)
  const vu16 high = vu16{} + 0xffff0000u;
  return acc + (vf16)(a << 16) * (vf16)(b << 16) + (vf16)(a & high) * (vf16)(b & high);
}
#endif
// bf16 attention with a head size of whole 32-element chunks takes its scores from dot_pairs.
template <typename T, int64_t head_dim>
constexpr bool kScoresByPairs = kDotPairs && std::is_same_v<T, bf16> && head_dim % 32 == 0;
// ... and its values too: the weights rounded to bf16 (as transformers' eager attention rounds them), the V rows
// of two positions interleaved into pairs.
template <typename T>
constexpr bool kValuesByPairs = kDotPairs && std::is_same_v<T, bf16>;

// Lane i of the result: the sum of the 16 lanes of v[i]. A tree of pairwise shuffles and adds (45 ops for
// 16 sums, where one horizontal sum per vector costs ~8): level k halves the partial sums per row and
// doubles the rows per vector, keeping rows in order.
inline vf16 row_sums16(vf16 v[16]) {
  const vi16 a1 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
  const vi16 b1 = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
  const vi16 a2 = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27};
  const vi16 b2 = {4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31};
  const vi16 a3 = {0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29};
  const vi16 b3 = {2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31};
  const vi16 a4 = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
  const vi16 b4 = {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
  vf16 w[8], x[4], y[2];
  for (int k = 0; k < 8; ++k) w[k] = __builtin_shuffle(v[2 * k], v[2 * k + 1], a1) + __builtin_shuffle(v[2 * k], v[2 * k + 1], b1);
  for (int k = 0; k < 4; ++k) x[k] = __builtin_shuffle(w[2 * k], w[2 * k + 1], a2) + __builtin_shuffle(w[2 * k], w[2 * k + 1], b2);
  for (int k = 0; k < 2; ++k) y[k] = __builtin_shuffle(x[2 * k], x[2 * k + 1], a3) + __builtin_shuffle(x[2 * k], x[2 * k + 1], b3);
  return __builtin_shuffle(y[0], y[1], a4) + __builtin_shuffle(y[0], y[1], b4);
}

// The largest of p[0 .. n), NaNs passed over as std::max passes them. `omp simd reduction(max)` left this loop
// scalar (one VMAXSS after another, each waiting on the last): a fifth of the decode kernel's own time.
inline float max_of(const float* p, int64_t n) {
  vf16 best = vf16{} - std::numeric_limits<float>::infinity();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const vf16 v = load16(p + i);
    best = v > best ? v : best;
  }
  float m = -std::numeric_limits<float>::infinity();
  for (int lane = 0; lane < 16; ++lane) m = std::max(m, best[lane]);
  for (; i < n; ++i) m = std::max(m, p[i]);
  return m;
}

constexpr int kTile = 16;

// Into L2 (locality 2: prefetcht1), not L1: an L1 prefetch holds one of the core's few L1 miss buffers until
// its line arrives, and a block's 100-200 lines queued behind them left the decode kernel at 16 GB/s
// (float32) and 14 GB/s (bfloat16) of the ~28 a 256 MB sum streams on 2 Zen 4 cores; through L2, which
// tracks many more misses, 20-22 GB/s (batch 32 x 310 tokens, cold cache: 0.95 -> 0.75 ms float32, 0.53 ->
// 0.39 ms bfloat16 per layer). Fetching two or three blocks ahead instead of one changed nothing.
inline void prefetch_bytes(const char* p, int64_t bytes) {
  for (int64_t byte = 0; byte < bytes; byte += 64) __builtin_prefetch(p + byte, 0, 2);
}

// Scores of `rows` (<= kTile rows, `row_stride` apart, this KV head's head_dim elements each) against GC
// query heads (qf: GC x head_dim, scaled): out[g * out_stride + t]. Writes a whole vector per head (rows past
// `rows` get 0), so out rows need kTile - 1 elements of slack.
template <typename T, int64_t head_dim, int GC>
inline void tile_scores(const float* qf, const T* k, int64_t row_stride, int rows, float* out, int64_t out_stride,
                        const char* ahead, int64_t ahead_stride) {
  constexpr int C = head_dim / 16;
  vf16 qv[GC][C];
  for (int g = 0; g < GC; ++g)
    for (int c = 0; c < C; ++c) qv[g][c] = load16(qf + g * head_dim + c * 16);
  vf16 part[GC][kTile];
  for (int t = 0; t < kTile; ++t) {
    if (t < rows) {
      if (ahead != nullptr) prefetch_bytes(ahead + t * ahead_stride, head_dim * sizeof(T));
      vf16 kv[C];
      for (int c = 0; c < C; ++c) kv[c] = load16(k + t * row_stride + c * 16);
      for (int g = 0; g < GC; ++g) {
        vf16 a = qv[g][0] * kv[0];
        for (int c = 1; c < C; ++c) a += qv[g][c] * kv[c];
        part[g][t] = a;
      }
    } else {
      for (int g = 0; g < GC; ++g) part[g][t] = vf16{};
    }
  }
  for (int g = 0; g < GC; ++g) store16(out + g * out_stride, row_sums16(part[g]));
}

// tile_scores for bf16 rows by dot_pairs: qb holds GC heads of raw (unscaled) bf16 query, head_dim each;
// the scale multiplies the sums.
template <int64_t head_dim, int GC>
inline void tile_scores_pairs(const bf16* qb, const bf16* k, int64_t row_stride, int rows, float scale, float* out,
                              int64_t out_stride, const char* ahead, int64_t ahead_stride) {
  constexpr int C = head_dim / 32;
  vu16 qv[GC][C];
  for (int g = 0; g < GC; ++g)
    for (int c = 0; c < C; ++c) qv[g][c] = load_pairs(qb + g * head_dim + c * 32);
  vf16 part[GC][kTile];
  for (int t = 0; t < kTile; ++t) {
    if (t < rows) {
      if (ahead != nullptr) prefetch_bytes(ahead + t * ahead_stride, head_dim * sizeof(bf16));
      vu16 kv[C];
      for (int c = 0; c < C; ++c) kv[c] = load_pairs(k + t * row_stride + c * 32);
      for (int g = 0; g < GC; ++g) {
        vf16 a = dot_pairs(vf16{}, kv[0], qv[g][0]);
        for (int c = 1; c < C; ++c) a = dot_pairs(a, kv[c], qv[g][c]);
        part[g][t] = a;
      }
    } else {
      for (int g = 0; g < GC; ++g) part[g][t] = vf16{};
    }
  }
  for (int g = 0; g < GC; ++g) store16(out + g * out_stride, row_sums16(part[g]) * scale);
}

// acc[g] (head_dim floats each) += sum over the tile's rows of p[g * p_stride + t] * v[t], for GC query heads.
template <typename T, int64_t head_dim, int GC>
inline void tile_values(const float* p, int64_t p_stride, const T* v, int64_t row_stride, int rows, float* acc,
                        const char* ahead, int64_t ahead_stride) {
  constexpr int C = head_dim / 16;
  vf16 av[GC][C];
  for (int g = 0; g < GC; ++g)
    for (int c = 0; c < C; ++c) av[g][c] = load16(acc + g * head_dim + c * 16);
  for (int t = 0; t < rows; ++t) {
    if (ahead != nullptr) prefetch_bytes(ahead + t * ahead_stride, head_dim * sizeof(T));
    vf16 vv[C];
    for (int c = 0; c < C; ++c) vv[c] = load16(v + t * row_stride + c * 16);
    for (int g = 0; g < GC; ++g) {
      const float w = p[g * p_stride + t];
      for (int c = 0; c < C; ++c) av[g][c] += w * vv[c];
    }
  }
  for (int g = 0; g < GC; ++g)
    for (int c = 0; c < C; ++c) store16(acc + g * head_dim + c * 16, av[g][c]);
}

// In place: v[i][j] <- v[j][i]. Transposing swaps every bit of the row index with the same bit of the
// column index; each stage swaps one bit, as the off-diagonal s x s blocks of every 2s x 2s block trade
// places (16 two-source shuffles a stage, 64 for the 16 x 16).
inline void transpose16(vf16 v[16]) {
  const vi16 lo8 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
  const vi16 hi8 = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
  const vi16 lo4 = {0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27};
  const vi16 hi4 = {4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31};
  const vi16 lo2 = {0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29};
  const vi16 hi2 = {2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31};
  const vi16 lo1 = {0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30};
  const vi16 hi1 = {1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31};
  auto stage = [&](int s, vi16 lo, vi16 hi) {
    for (int i = 0; i < 16; ++i) {
      if (i & s) continue;
      const vf16 a = v[i], b = v[i + s];
      v[i] = __builtin_shuffle(a, b, lo);
      v[i + s] = __builtin_shuffle(a, b, hi);
    }
  };
  stage(8, lo8, hi8);
  stage(4, lo4, hi4);
  stage(2, lo2, hi2);
  stage(1, lo1, hi1);
}

// One KV head's part of a tile (rows <= kTile rows, `row_stride` apart), transposed into kt [head_dim][kTile]
// float32: kt[d] holds dimension d of all the tile's rows (0 past `rows`).
template <typename T, int64_t head_dim>
inline void transpose_tile(const T* k, int64_t row_stride, int rows, float* kt) {
  for (int64_t c = 0; c < head_dim / 16; ++c) {
    vf16 v[kTile];
    for (int t = 0; t < kTile; ++t) v[t] = t < rows ? load16(k + t * row_stride + c * 16) : vf16{};
    transpose16(v);
    for (int d = 0; d < 16; ++d) store16(kt + (c * 16 + d) * kTile, v[d]);
  }
}

// Scores of a transposed tile against N (query row, head) pairs at once: out[i][t] = q[i] . k_t, a vector
// of kTile keys per pair built from head_dim broadcast FMAs (each kt[d] loaded once for the N pairs), with
// no reduction tree.
template <int64_t head_dim, int N>
inline void transposed_scores(const float* kt, const float* const* q, float* const* out) {
  vf16 a[N];
  for (int i = 0; i < N; ++i) a[i] = vf16{};
  for (int64_t d = 0; d < head_dim; ++d) {
    const vf16 k = load16(kt + d * kTile);
    for (int i = 0; i < N; ++i) a[i] += q[i][d] * k;
  }
  for (int i = 0; i < N; ++i) store16(out[i], a[i]);
}

// transpose_tile for bf16 pairs: kt [head_dim / 2][kTile] 32-bit lanes, lane t of vector w holding dimensions
// 2w and 2w + 1 of row t (the pair dot_pairs multiplies by the query's same pair).
template <int64_t head_dim>
inline void transpose_pairs(const bf16* k, int64_t row_stride, int rows, float* kt) {
  for (int64_t c = 0; c < head_dim / 32; ++c) {
    vf16 v[kTile];
    for (int t = 0; t < kTile; ++t) v[t] = t < rows ? (vf16)load_pairs(k + t * row_stride + c * 32) : vf16{};
    transpose16(v);  // moves bits: the lanes need not be floats
    for (int w = 0; w < 16; ++w) store16(kt + (c * 16 + w) * kTile, v[w]);
  }
}

template <int64_t head_dim, int N>
inline void transposed_scores_pairs(const float* kt, const bf16* const* q, float scale, float* const* out) {
  vf16 a[N];
  for (int i = 0; i < N; ++i) a[i] = vf16{};
  for (int64_t w = 0; w < head_dim / 2; ++w) {
    const vu16 k = (vu16)load16(kt + w * kTile);
    for (int i = 0; i < N; ++i) {
      uint32_t pair;
      std::memcpy(&pair, q[i] + 2 * w, sizeof(pair));
      a[i] = dot_pairs(a[i], k, vu16{} + pair);
    }
  }
  for (int i = 0; i < N; ++i) store16(out[i], a[i] * scale);
}

// V rows 2j and 2j + 1 of a tile interleaved as bf16 pairs, 32-bit lane d of vector (j, c) holding dimension
// 16c + d of both (a missing last row: zeros): vp[(j * head_dim / 16 + c) * 16 + d]. Prefetches the next
// block's same rows when `ahead` is given.
template <int64_t head_dim>
inline void interleave_pairs(const bf16* v, int64_t row_stride, int rows, float* vp, const char* ahead,
                             int64_t ahead_stride) {
  constexpr int C = head_dim / 16;
  for (int j = 0; 2 * j < rows; ++j) {
    const bf16* a = v + 2 * j * row_stride;
    const bool two = 2 * j + 1 < rows;
    if (ahead != nullptr) {
      prefetch_bytes(ahead + 2 * j * ahead_stride, head_dim * sizeof(bf16));
      if (two) prefetch_bytes(ahead + (2 * j + 1) * ahead_stride, head_dim * sizeof(bf16));
    }
    for (int c = 0; c < C; ++c) {
      const vu16 first = widen16(a + c * 16);
      const vu16 second = two ? widen16(a + row_stride + c * 16) << 16 : vu16{};
      store16(vp + (j * C + c) * 16, (vf16)(first | second));
    }
  }
}

// tile_values by dot_pairs: acc[g] += sum over the tile's rows of w[g * w_stride + t] * v[t], the weights w in
// bf16 (read in pairs: w[rows] must be finite when rows is odd), v interleaved by interleave_pairs.
template <int64_t head_dim, int GC>
inline void tile_values_pairs(const bf16* w, int64_t w_stride, const float* vp, int rows, float* acc) {
  constexpr int C = head_dim / 16;
  vf16 av[GC][C];
  for (int g = 0; g < GC; ++g)
    for (int c = 0; c < C; ++c) av[g][c] = load16(acc + g * head_dim + c * 16);
  for (int j = 0; 2 * j < rows; ++j) {
    vu16 pair[GC];
    for (int g = 0; g < GC; ++g) {
      uint32_t bits;
      std::memcpy(&bits, w + g * w_stride + 2 * j, sizeof(bits));
      pair[g] = vu16{} + bits;
    }
    for (int c = 0; c < C; ++c) {
      const vu16 vv = (vu16)load16(vp + (j * C + c) * 16);
      for (int g = 0; g < GC; ++g) av[g][c] = dot_pairs(av[g][c], vv, pair[g]);
    }
  }
  for (int g = 0; g < GC; ++g)
    for (int c = 0; c < C; ++c) store16(acc + g * head_dim + c * 16, av[g][c]);
}

// f(std::integral_constant<int, count>) for a count of 1 .. 4.
template <typename F>
inline void with_count(int count, F&& f) {
  switch (count) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    default: f(std::integral_constant<int, 4>{}); break;
  }
}

// The query heads of one KV head in runs of at most 4 (the accumulators of a run stay in registers).
template <typename F>
inline void for_head_runs(int64_t group, F&& f) {
  for (int64_t g0 = 0; g0 < group; g0 += 4) {
    with_count(static_cast<int>(std::min<int64_t>(4, group - g0)), [&](auto gc) { f(g0, gc); });
  }
}

// Decode attention is memory-bound: every step reads each sequence's whole K and V. One work item is a
// sequence (or a split of its visible rows, when there are too few sequences to keep every thread busy) and
// reads all KV heads of each row it covers, so a block is one contiguous run of block_size x kv_heads x
// head_dim elements that the hardware prefetcher streams. Blocks lie anywhere in the cache, so the next
// block is prefetched a block ahead through the table (row j of the next block while row j of this one is
// computed). Walking (sequence, KV head) pairs instead, as this kernel once did, read 1/kv_heads of each row
// at a time and waited on DRAM: 5 GB/s of the 27 GB/s two Zen 4 cores stream (float32; bf16 3 GB/s).
//
// The rows of a prefill chunk come in groups of up to kGroupRows consecutive query rows of one sequence
// that share every K/V read (each row masks the positions past its own): one row at a time re-read a deep
// context from DRAM per row (a 128-token chunk after 4k cached tokens: 0.72 ms per token per 1000
// positions of step time). Such a group is compute-bound: each K tile is transposed once per KV head
// (transpose_tile) and its scores for all the group's (row, query head) pairs are plain broadcast FMAs,
// where a lone row pays a reduction tree per 16 scores; bf16 V rows are widened once for the group. On
// 2 Zen 4 cores, per layer (9 heads, 3 KV heads, d 64): a 1500-token prompt 37 -> 21 ms (float32) and
// 40 -> 22 ms (bfloat16), the work-stealing order below included; 16 x 256-token prompts 14 -> 12 ms. With
// AVX512-BF16 pairs for scores and values, bfloat16: 1500 tokens 14.5 ms, 16 x 256 8.4 ms, a decode
// batch of 32 x 300 0.31 -> 0.25 ms (warm caches).
//
// Splits (flash-decoding): each keeps its own running max and sum per head; a second pass merges them.
constexpr int64_t kMinSplitRows = 64;   // below this a split's merge costs more than its parallelism wins
constexpr int64_t kItemsPerThread = 4;  // enough items that uneven lengths still balance
constexpr int64_t kGroupRows = 8;       // query rows of one sequence per work item
constexpr int64_t kSharedRows = 2;      // an item with this many rows transposes its K tiles
constexpr int kPairsAtOnce = 4;         // (row, query head) pairs per pass over a transposed tile
static_assert(kPairsAtOnce <= 4, "with_count dispatches counts of 1 .. 4");

// Kernels keep their per-thread scratch vectors between calls (thread_local): allocating them afresh in every
// thread of every call (~540 mallocs a batch-32 decode step) made the threads queue on the allocator's lock
// when they share one arena, as a shard's do (spindle_server/heap.py). A vector grown past kScratchKeep
// elements (a long context's scores) is handed back after the call instead of held.
constexpr size_t kScratchKeep = size_t(1) << 20;
template <typename V>
inline void release_if_large(V& v) {
  if (v.capacity() > kScratchKeep) V().swap(v);
}

template <typename T, int64_t head_dim>
void decode_kernel(const T* q, const T* k_cache, const T* v_cache, const int32_t* tables, const int32_t* row_seqs,
                   const int32_t* lens, T* out, int64_t rows, int64_t num_heads, int64_t num_kv_heads,
                   int64_t block_size, int64_t table_width, float scale, int64_t window, float softcap,
                   int64_t q_stride_b, int64_t q_stride_h) {
  const int64_t group = num_heads / num_kv_heads;
  const int64_t row_stride = num_kv_heads * head_dim;  // one token's K (or V) across heads
  const int64_t block_stride = block_size * row_stride;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  // A sliding window (> 0) sees the last `window` positions of a sequence: [first, len).
  auto first_of = [&](int64_t len) { return window > 0 ? std::max<int64_t>(len - window, 0) : int64_t(0); };
  // Row groups: group g is rows [starts[g], starts[g + 1]), all of one sequence; [lo, hi) spans what they see.
  std::vector<int64_t> starts, group_lo, group_hi;
  for (int64_t r = 0; r < rows; ++r) {
    const bool joins = r > 0 && row_seqs != nullptr && row_seqs[r] == row_seqs[r - 1] && r - starts.back() < kGroupRows;
    if (!joins) {
      starts.push_back(r);
      group_lo.push_back(std::numeric_limits<int64_t>::max());
      group_hi.push_back(0);
    }
    group_lo.back() = std::min<int64_t>(group_lo.back(), first_of(lens[r]));
    group_hi.back() = std::max<int64_t>(group_hi.back(), lens[r]);
  }
  starts.push_back(rows);
  const int64_t num_groups = static_cast<int64_t>(group_lo.size());
  int64_t longest = 0;
  for (int64_t g = 0; g < num_groups; ++g) longest = std::max<int64_t>(longest, group_hi[g] - group_lo[g]);
  const int64_t threads = at::get_num_threads();
  int64_t splits = 1;
  if (num_groups < kItemsPerThread * threads) {
    splits = std::min((kItemsPerThread * threads + num_groups - 1) / num_groups,
                      std::max<int64_t>(longest / kMinSplitRows, 1));
  }
  // Per row and split (splits > 1): each head's running max, sum of exps and unnormalized output.
  std::vector<float> part_max, part_sum, part_acc;
  if (splits > 1) {
    part_max.resize(rows * splits * num_heads);
    part_sum.resize(rows * splits * num_heads);
    part_acc.resize(rows * splits * num_heads * head_dim);
  }
  const int64_t row_bytes = row_stride * static_cast<int64_t>(sizeof(T));
  const int64_t head_bytes = head_dim * static_cast<int64_t>(sizeof(T));

  // Items are taken from a shared counter, longest first: at::parallel_for hands each thread one contiguous
  // range, and a chunk's row groups see ever longer contexts (a 1500-token prompt: the second half of its
  // groups is 3/4 of the work), so the thread with the tail ran alone for half the call.
  std::vector<int64_t> order(num_groups);
  for (int64_t g = 0; g < num_groups; ++g) order[g] = g;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return group_hi[a] - group_lo[a] > group_hi[b] - group_lo[b];
  });
  const int64_t num_items = num_groups * splits;
  std::atomic<int64_t> next_item{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    // Scratch kept per thread between calls (see kScratchKeep).
    thread_local std::vector<float> qf, acc, scores, top, total, kt, vt;
    thread_local std::vector<bf16> qb, wb;  // raw bf16 query rows, and the softmax weights in bf16, for dot_pairs
    kt.resize(head_dim * kTile);
    vt.resize(kTile * head_dim);
    for (int64_t item = next_item++; item < num_items; item = next_item++) {
      const int64_t gi = order[item / splits], split = item % splits;
      const int64_t r0 = starts[gi], nr = starts[gi + 1] - r0;
      const int64_t visible = std::max<int64_t>(group_hi[gi] - group_lo[gi], 0);
      const int64_t lo = group_lo[gi] + visible * split / splits, hi = group_lo[gi] + visible * (split + 1) / splits;
      const int64_t n = std::max<int64_t>(hi - lo, 0);
      // Scores are rows of ns = n + kTile: a tile writes whole vectors (the last one up to kTile - 1 past n).
      const int64_t ns = n + kTile, heads = nr * num_heads;  // (row, query head) pairs of the item
      if constexpr (kScoresByPairs<T, head_dim>) {
        qb.resize(heads * head_dim);
      } else {
        qf.resize(heads * head_dim);
      }
      acc.assign(heads * head_dim, 0.0f);
      scores.resize(heads * ns);
      top.assign(heads, kNegInf);
      total.assign(heads, 0.0f);
      if (n > 0) {
        // q may be a strided view (the QKV projection's output split into heads): rows q_stride_h apart.
        for (int64_t r = 0; r < nr; ++r) {
          for (int64_t hg = 0; hg < num_heads; ++hg) {
            const T* qp = q + (r0 + r) * q_stride_b + hg * q_stride_h;
            if constexpr (kScoresByPairs<T, head_dim>) {
              std::memcpy(qb.data() + (r * num_heads + hg) * head_dim, qp, head_dim * sizeof(bf16));
            } else {
              float* qd = qf.data() + (r * num_heads + hg) * head_dim;
              for (int64_t d = 0; d < head_dim; ++d) qd[d] = to_float(qp[d]) * scale;
            }
          }
        }
        const int32_t* table = tables + (row_seqs != nullptr ? row_seqs[r0] : r0) * table_width;

        // Every tile of [lo, hi) (consecutive rows of one block): f(its first row, its row count, its index
        // from lo, the same rows of the next block or nullptr). Each KV head's pass over a tile prefetches
        // its part of those rows, a row per row it reads: the next block streams in while this one
        // computes, and never more lines at once than the core can have in flight.
        auto for_each_tile = [&](const T* cache, auto&& f) {
          for (int64_t start = lo - lo % block_size; start < hi; start += block_size) {
            const T* block = cache + table[start / block_size] * block_stride;
            const bool more = start + block_size < hi;
            const char* next =
                more ? reinterpret_cast<const char*>(cache + table[start / block_size + 1] * block_stride) : nullptr;
            const int64_t stop = std::min(block_size, hi - start);
            for (int64_t j = std::max<int64_t>(lo - start, 0); j < stop; j += kTile) {
              const int rows_in_tile = static_cast<int>(std::min<int64_t>(kTile, stop - j));
              f(block + j * row_stride, rows_in_tile, start + j - lo, more ? next + j * row_bytes : nullptr);
            }
          }
        };
        // The first block of each pass has no block before it to prefetch it: K's now, V's during the softmax.
        auto prefetch_first = [&](const T* cache) {
          const int64_t j = lo % block_size, count = std::min(block_size - j, hi - lo);
          prefetch_bytes(reinterpret_cast<const char*>(cache + table[lo / block_size] * block_stride + j * row_stride),
                         count * row_bytes);
        };

        // Every tile, then KV head, then row of the item, then run of that head's query heads: f(the tile's
        // rows of that head, their count, their index from lo, the run's first (row, query head) pair, the
        // run length, and the next block's part for this head to prefetch, once per tile and head, or nullptr).
        auto for_each_run = [&](const T* cache, auto&& f) {
          for_each_tile(cache, [&](const T* tile, int tile_rows, int64_t t, const char* ahead) {
            for (int64_t h = 0; h < num_kv_heads; ++h) {
              for (int64_t r = 0; r < nr; ++r) {
                for_head_runs(group, [&](int64_t g0, auto gc) {
                  f(tile + h * head_dim, tile_rows, t, r * num_heads + h * group + g0, gc,
                    r == 0 && g0 == 0 && ahead ? ahead + h * head_bytes : nullptr);
                });
              }
            }
          });
        };

        // Several rows of one sequence (a chunk's): each tile's KV head is transposed once and serves every
        // (row, query head) pair with broadcast FMAs. One row (decode) has too few pairs to pay for the
        // transpose: its scores come from the reduction tree.
        const bool shared = nr >= kSharedRows;
        // This head's part of the next block's rows of the tile, a row per row the tile has.
        auto prefetch_head = [&](const char* ahead, int tile_rows, int64_t h) {
          if (ahead == nullptr) return;
          for (int j = 0; j < tile_rows; ++j) prefetch_bytes(ahead + j * row_bytes + h * head_bytes, head_bytes);
        };
        prefetch_first(k_cache);
        if (shared) {
          const int64_t pairs = nr * group;
          for_each_tile(k_cache, [&](const T* tile, int tile_rows, int64_t t, const char* ahead) {
            for (int64_t h = 0; h < num_kv_heads; ++h) {
              prefetch_head(ahead, tile_rows, h);
              if constexpr (kScoresByPairs<T, head_dim>) {
                transpose_pairs<head_dim>(tile + h * head_dim, row_stride, tile_rows, kt.data());
              } else {
                transpose_tile<T, head_dim>(tile + h * head_dim, row_stride, tile_rows, kt.data());
              }
              for (int64_t p0 = 0; p0 < pairs; p0 += kPairsAtOnce) {
                const float* qs[kPairsAtOnce];
                const bf16* qs_raw[kPairsAtOnce];
                float* outs[kPairsAtOnce];
                const int count = static_cast<int>(std::min<int64_t>(kPairsAtOnce, pairs - p0));
                for (int i = 0; i < count; ++i) {
                  const int64_t at = (p0 + i) / group * num_heads + h * group + (p0 + i) % group;
                  qs[i] = kScoresByPairs<T, head_dim> ? nullptr : qf.data() + at * head_dim;
                  qs_raw[i] = kScoresByPairs<T, head_dim> ? qb.data() + at * head_dim : nullptr;
                  outs[i] = scores.data() + at * ns + t;
                }
                with_count(count, [&](auto at_once) {
                  if constexpr (kScoresByPairs<T, head_dim>) {
                    transposed_scores_pairs<head_dim, decltype(at_once)::value>(kt.data(), qs_raw, scale, outs);
                  } else {
                    transposed_scores<head_dim, decltype(at_once)::value>(kt.data(), qs, outs);
                  }
                });
              }
            }
          });
        } else {
          for_each_run(k_cache, [&](const T* kh, int tile_rows, int64_t t, int64_t at, auto gc, const char* ahead) {
            if constexpr (kScoresByPairs<T, head_dim>) {
              tile_scores_pairs<head_dim, decltype(gc)::value>(qb.data() + at * head_dim, kh, row_stride, tile_rows,
                                                               scale, scores.data() + at * ns + t, ns, ahead,
                                                               row_bytes);
            } else {
              tile_scores<T, head_dim, decltype(gc)::value>(qf.data() + at * head_dim, kh, row_stride, tile_rows,
                                                             scores.data() + at * ns + t, ns, ahead, row_bytes);
            }
          });
        }
        prefetch_first(v_cache);
        for (int64_t r = 0; r < nr; ++r) {
          // This row sees [first, len) of the sequence: [a, z) of the item's scores; the rest weigh 0.
          const int64_t len = lens[r0 + r];
          const int64_t a = std::clamp<int64_t>(first_of(len) - lo, 0, n), z = std::clamp<int64_t>(len - lo, 0, n);
          for (int64_t hg = 0; hg < num_heads; ++hg) {
            float* sg = scores.data() + (r * num_heads + hg) * ns;
            std::fill(sg, sg + a, 0.0f);
            std::fill(sg + std::max(a, z), sg + n, 0.0f);
            if (z <= a) continue;  // nothing visible in this split (or a padding row)
            if (softcap > 0.0f) {  // Gemma 2's soft-capped logits
              for (int64_t t = a; t < z; ++t) sg[t] = softcap * std::tanh(sg[t] / softcap);
            }
            const float m = max_of(sg + a, z - a);
            float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
            for (int64_t t = a; t < z; ++t) {
              sg[t] = softmax_exp(sg[t] - m);
              sum += sg[t];
            }
            top[r * num_heads + hg] = m;
            total[r * num_heads + hg] = sum;
          }
        }
        if constexpr (kValuesByPairs<T>) {
          wb.resize(heads * ns);
          for (int64_t at = 0; at < heads; ++at) {
            const float* sg = scores.data() + at * ns;
            bf16* wg = wb.data() + at * ns;
#pragma omp simd
            for (int64_t t = 0; t < n; ++t) wg[t] = bf16_bits(sg[t]);
            wg[n] = 0;  // the pair partner of an odd last row
          }
        }
        if (shared) {
          // bf16 rows are interleaved into pairs (AVX512-BF16) or widened once per tile and head for all the
          // rows of the item, not once per row.
          for_each_tile(v_cache, [&](const T* tile, int tile_rows, int64_t t, const char* ahead) {
            for (int64_t h = 0; h < num_kv_heads; ++h) {
              prefetch_head(ahead, tile_rows, h);
              if constexpr (kValuesByPairs<T>) {
                interleave_pairs<head_dim>(tile + h * head_dim, row_stride, tile_rows, vt.data(), nullptr, 0);
                for (int64_t r = 0; r < nr; ++r) {
                  for_head_runs(group, [&](int64_t g0, auto gc) {
                    const int64_t at = r * num_heads + h * group + g0;
                    tile_values_pairs<head_dim, decltype(gc)::value>(wb.data() + at * ns + t, ns, vt.data(),
                                                                      tile_rows, acc.data() + at * head_dim);
                  });
                }
              } else {
                const float* vh = vt.data();
                int64_t stride = head_dim;
                if constexpr (std::is_same_v<T, float>) {
                  vh = tile + h * head_dim;
                  stride = row_stride;
                } else {
                  for (int j = 0; j < tile_rows; ++j)
                    for (int64_t c = 0; c < head_dim / 16; ++c)
                      store16(vt.data() + j * head_dim + c * 16, load16(tile + j * row_stride + h * head_dim + c * 16));
                }
                for (int64_t r = 0; r < nr; ++r) {
                  for_head_runs(group, [&](int64_t g0, auto gc) {
                    const int64_t at = r * num_heads + h * group + g0;
                    tile_values<float, head_dim, decltype(gc)::value>(scores.data() + at * ns + t, ns, vh, stride,
                                                                       tile_rows, acc.data() + at * head_dim, nullptr,
                                                                       0);
                  });
                }
              }
            }
          });
        } else {
          for_each_run(v_cache, [&](const T* vh, int tile_rows, int64_t t, int64_t at, auto gc, const char* ahead) {
            if constexpr (kValuesByPairs<T>) {
              interleave_pairs<head_dim>(vh, row_stride, tile_rows, vt.data(), ahead, row_bytes);
              tile_values_pairs<head_dim, decltype(gc)::value>(wb.data() + at * ns + t, ns, vt.data(), tile_rows,
                                                                acc.data() + at * head_dim);
            } else {
              tile_values<T, head_dim, decltype(gc)::value>(scores.data() + at * ns + t, ns, vh, row_stride,
                                                             tile_rows, acc.data() + at * head_dim, ahead, row_bytes);
            }
          });
        }
      }
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t row = r0 + r;
        if (splits == 1) {
          T* o = out + row * num_heads * head_dim;
          for (int64_t hg = 0; hg < num_heads; ++hg) {
            const int64_t at = r * num_heads + hg;
            const float inv = total[at] > 0.0f ? 1.0f / total[at] : 0.0f;  // 0: a padding row attends to nothing
            for (int64_t d = 0; d < head_dim; ++d) from_float(acc[at * head_dim + d] * inv, o + hg * head_dim + d);
          }
        } else {
          const int64_t at = (row * splits + split) * num_heads;
          std::copy(top.begin() + r * num_heads, top.begin() + (r + 1) * num_heads, part_max.begin() + at);
          std::copy(total.begin() + r * num_heads, total.begin() + (r + 1) * num_heads, part_sum.begin() + at);
          std::copy(acc.begin() + r * num_heads * head_dim, acc.begin() + (r + 1) * num_heads * head_dim,
                    part_acc.begin() + at * head_dim);
        }
      }
    }
    release_if_large(scores);
    release_if_large(wb);
  });
  if (splits == 1) return;
  at::parallel_for(0, rows * num_heads, 1, [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> merged;
    merged.resize(head_dim);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / num_heads, hg = bh % num_heads;
      float m = kNegInf;
      for (int64_t s = 0; s < splits; ++s) m = std::max(m, part_max[(b * splits + s) * num_heads + hg]);
      T* o = out + bh * head_dim;
      if (m == kNegInf) {  // nothing visible (a padding row)
        for (int64_t d = 0; d < head_dim; ++d) from_float(0.0f, o + d);
        continue;
      }
      std::fill(merged.begin(), merged.end(), 0.0f);
      float sum = 0.0f;
      for (int64_t s = 0; s < splits; ++s) {
        const int64_t at = (b * splits + s) * num_heads + hg;
        const float w = std::exp(part_max[at] - m);  // 0 for an empty split (max -inf)
        sum += part_sum[at] * w;
        const float* a = part_acc.data() + at * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) merged[d] += a[d] * w;
      }
      const float inv = 1.0f / sum;
      for (int64_t d = 0; d < head_dim; ++d) from_float(merged[d] * inv, o + d);
    }
  });
}

// Row r of q attends over positions [.., row_lens[r]) of sequence row_seqs[r]'s blocks (row_seqs undefined:
// row r is sequence r). Decode rows are one per sequence; a prefill chunk's rows each see the context up to
// their own position, so a chunk runs as rows of its sequence with lengths ctx - q_len + 1 .. ctx (on 2 Zen 4
// cores ~2x faster than torch's SDPA over the gathered context at 16 x 256-token prompts).
at::Tensor attention_rows(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                          const at::Tensor& block_tables, const c10::optional<at::Tensor>& row_seqs,
                          const at::Tensor& row_lens, double scale, int64_t window, double softcap) {
  TORCH_CHECK(q.dim() == 3, "q must be [rows, num_heads, head_dim]");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
              "k_cache and v_cache must both be [num_blocks, block_size, num_kv_heads, head_dim]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "the KV caches must be contiguous");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(),
              "q and the KV caches must share a dtype");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && row_lens.scalar_type() == at::kInt,
              "block_tables and context_lens must be int32");
  const int64_t rows = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t block_size = k_cache.size(1), num_kv_heads = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == head_dim && num_heads % num_kv_heads == 0, "head shapes do not match");
  TORCH_CHECK(block_tables.dim() == 2 && row_lens.numel() == rows, "block_tables must be 2-d, one length per row");
  at::Tensor seqs;
  if (row_seqs.has_value()) {
    seqs = row_seqs->contiguous();
    TORCH_CHECK(seqs.scalar_type() == at::kInt && seqs.numel() == rows, "row_seqs must be int32, one per row");
  } else {
    TORCH_CHECK(block_tables.size(0) == rows, "block_tables must be [batch, width] and context_lens [batch]");
  }
  // q is read in place when its head rows are unit-stride (a view of the QKV output); copied otherwise.
  const at::Tensor qc = q.stride(2) == 1 ? q : q.contiguous();
  const at::Tensor tables = block_tables.contiguous(), lens = row_lens.contiguous();
  const int64_t width = tables.size(1), num_seqs = tables.size(0);
  const int32_t* len_ptr = lens.data_ptr<int32_t>();
  const int32_t* seq_ptr = seqs.defined() ? seqs.data_ptr<int32_t>() : nullptr;
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(len_ptr[r] <= width * block_size, "a context is longer than its block table");
    TORCH_CHECK(seq_ptr == nullptr || (seq_ptr[r] >= 0 && seq_ptr[r] < num_seqs), "row_seqs out of range");
  }
  at::Tensor out = at::empty({rows, num_heads, head_dim}, q.options());
  if (rows == 0) return out;
  const auto s = static_cast<float>(scale);
  const auto cap = static_cast<float>(softcap);
  TORCH_CHECK(window >= 0 && softcap >= 0.0, "window and softcap must be >= 0 (0: off)");
  const bool known = head_dim == 32 || head_dim == 64 || head_dim == 80 || head_dim == 96 || head_dim == 128 ||
                     head_dim == 256;
  TORCH_CHECK(known, "paged attention (CPU) takes head_dim 32, 64, 80, 96, 128 or 256, got ", head_dim);
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16,
              "paged attention (CPU) takes float32 or bfloat16, got ", q.scalar_type());
  const bool is_bf16 = q.scalar_type() == at::kBFloat16;
  const int32_t* table_ptr = tables.data_ptr<int32_t>();
#define SPINDLE_DECODE(D)                                                                                  \
  if (head_dim == D) {                                                                                     \
    if (is_bf16) {                                                                                         \
      decode_kernel<bf16, D>(BF(qc), BF(k_cache), BF(v_cache), table_ptr, seq_ptr, len_ptr, BF(out), rows,   \
                             num_heads, num_kv_heads, block_size, width, s, window, cap, qc.stride(0),        \
                             qc.stride(1));                                                                \
    } else {                                                                                               \
      decode_kernel<float, D>(qc.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(),  \
                              table_ptr, seq_ptr, len_ptr, out.data_ptr<float>(), rows, num_heads,         \
                              num_kv_heads, block_size, width, s, window, cap, qc.stride(0), qc.stride(1)); \
    }                                                                                                      \
  }
  SPINDLE_DECODE(32)
  SPINDLE_DECODE(64)
  SPINDLE_DECODE(80)
  SPINDLE_DECODE(96)
  SPINDLE_DECODE(128)
  SPINDLE_DECODE(256)
#undef SPINDLE_DECODE
  return out;
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                                  int64_t window, double softcap) {
  return attention_rows(q, k_cache, v_cache, block_tables, c10::nullopt, context_lens, scale, window, softcap);
}

// ---- Elementwise kernels: one op each where the torch path takes 6-12 (dtype round trips included),
// which is most of a batch-1 step's overhead. They round where transformers rounds (bf16 results of
// each torch op), so bf16 output matches the reference's to the last bit in most elements.

inline float round_to(float x, float) { return x; }
inline float round_to(float x, bf16) {
  const uint32_t bits = static_cast<uint32_t>(bf16_bits(x)) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

#if defined(__AVX512BF16__)
// bf16 rows 16 lanes at a time, for the elementwise kernels below: VCVTNEPS2BF16 rounds 16 floats to bf16 (to
// nearest even) in one instruction where bf16_bits vectorizes to ~7, and each bf16 result of these kernels is
// rounded once or twice (as transformers rounds). With it, RCP14 and a Newton step in place of a division
// (~2^-28 relative error, below float's 2^-24) and one VPMOVZXWD per widening (widen16), on Sapphire Rapids
// bf16 silu_and_mul over 1024 x 1536 outputs took 0.55 -> 0.37 ms and rms_norm with its residual over
// 4096 x 576 0.72 -> 0.42 ms with their data in cache (in a prefill, where it streams from memory, ~20% of
// that). The instruction flushes subnormal floats (below 1.2e-38) to zero; nothing else differs.
typedef uint16_t vh16 __attribute__((vector_size(32)));
inline vh16 to_bf16(vf16 v) { return (vh16)_mm512_cvtneps_pbh((__m512)v); }
inline void store16(bf16* p, vf16 v) { *reinterpret_cast<vh16_u*>(p) = to_bf16(v); }
inline vf16 round16(vf16 v) {
  const vu16 wide = (vu16)_mm512_cvtepu16_epi32((__m256i)to_bf16(v)) << 16;
  return (vf16)wide;
}
// 1 / d to ~2^-28: RCP14's 2^-14 estimate and one Newton step.
inline vf16 reciprocal16(vf16 d) {
  const vf16 r = (vf16)_mm512_rcp14_ps((__m512)d);
  return r * (2.0f - d * r);
}
// softmax_exp, 16 lanes (NaN stays NaN: the clamps compare, as softmax_exp's do).
inline vf16 exp16(vf16 x) {
  x = x < -87.0f ? vf16{} - 87.0f : x;
  x = x > 87.0f ? vf16{} + 87.0f : x;
  vf16 n;
  const vf16 p = exp_reduced(x, &n);
  const vu16 bits = (vu16)(__builtin_convertvector(n, vi16) + 127) << 23;
  return p * (vf16)bits;
}
#endif

// Rows of a 2-d tensor with a unit inner stride; grain keeps a batch-1 call on one thread.
constexpr int64_t kRowGrain = 8;

#if defined(__AVX512BF16__)
// rms_norm_kernel's row for bf16 with a width of whole 16-lane vectors.
inline void rms_norm_row16(const bf16* xr, const bf16* rr, const bf16* weight, bf16* o, bf16* so, int64_t width,
                           float eps, float* buf) {
  vf16 ss = vf16{};
  for (int64_t i = 0; i < width; i += 16) {
    vf16 v = load16(xr + i);
    if (rr != nullptr) {
      v = round16(v + load16(rr + i));  // x + residual in bf16
      store16(so + i, v);
    }
    store16(buf + i, v);
    ss += v * v;
  }
  float total = 0.0f;
  for (int lane = 0; lane < 16; ++lane) total += ss[lane];
  const float scale = 1.0f / std::sqrt(total / static_cast<float>(width) + eps);
  for (int64_t i = 0; i < width; i += 16) store16(o + i, round16(load16(buf + i) * scale) * load16(weight + i));
}
#endif

template <typename T>
void rms_norm_kernel(const T* x, const T* residual, const T* weight, T* out, T* sum_out, int64_t rows, int64_t width,
                     float eps) {
  at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> storage;  // kept between calls (kScratchKeep)
    storage.resize(width);
    float* buf = storage.data();
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * width;
#if defined(__AVX512BF16__)
      if constexpr (std::is_same_v<T, bf16>) {
        if (width % 16 == 0) {
          rms_norm_row16(xr, residual != nullptr ? residual + r * width : nullptr, weight, out + r * width,
                         residual != nullptr ? sum_out + r * width : nullptr, width, eps, buf);
          continue;
        }
      }
#endif
      float ss = 0.0f;
      if (residual != nullptr) {
        const T* rr = residual + r * width;
        T* so = sum_out + r * width;
#pragma omp simd
        for (int64_t i = 0; i < width; ++i) {
          const float v = round_to(to_float(xr[i]) + to_float(rr[i]), T());  // x + residual in x's dtype
          buf[i] = v;
          from_float(v, so + i);
        }
      } else {
#pragma omp simd
        for (int64_t i = 0; i < width; ++i) buf[i] = to_float(xr[i]);
      }
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < width; ++i) ss += buf[i] * buf[i];
      const float scale = 1.0f / std::sqrt(ss / static_cast<float>(width) + eps);
      T* o = out + r * width;
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) {
        from_float(round_to(buf[i] * scale, T()) * to_float(weight[i]), o + i);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps,
                                             const c10::optional<at::Tensor>& residual) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "rms_norm (CPU) takes float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.dim() == 1 && weight.size(0) == x.size(-1),
              "rms_norm: weight must be [hidden] in x's dtype");
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  const int64_t width = x.size(-1), rows = width == 0 ? 0 : x.numel() / width;
  at::Tensor out = at::empty_like(xc);
  at::Tensor sum = xc;
  at::Tensor rc;
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type(),
                "rms_norm: residual must match x");
    rc = residual->contiguous();
    sum = at::empty_like(xc);
  }
  if (x.scalar_type() == at::kFloat) {
    rms_norm_kernel<float>(xc.data_ptr<float>(), rc.defined() ? rc.data_ptr<float>() : nullptr, wc.data_ptr<float>(),
                           out.data_ptr<float>(), sum.data_ptr<float>(), rows, width, static_cast<float>(eps));
  } else {
    rms_norm_kernel<bf16>(BF(xc), rc.defined() ? BF(rc) : nullptr, BF(wc),
                       BF(out), BF(sum), rows, width, static_cast<float>(eps));
  }
  return {out, sum};
}

template <typename T>
void rotate(T* t, const float* cos, const float* sin, int64_t tokens, int64_t heads, int64_t half,
            int64_t token_stride, int64_t head_stride) {
  at::parallel_for(0, tokens, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* c = cos + i * half;
      const float* s = sin + i * half;
      for (int64_t h = 0; h < heads; ++h) {
        T* x = t + i * token_stride + h * head_stride;
#pragma omp simd
        for (int64_t j = 0; j < half; ++j) {
          const float x1 = to_float(x[j]), x2 = to_float(x[j + half]);
          from_float(x1 * c[j] - x2 * s[j], x + j);
          from_float(x2 * c[j] + x1 * s[j], x + j + half);
        }
      }
    }
  });
}

void rotary_one(at::Tensor& t, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(t.dim() == 3 && t.stride(2) == 1, "rotary_embedding: q and k must be [T, heads, d] with unit stride in d");
  const int64_t half = t.size(2) / 2;
  TORCH_CHECK(cos.size(0) == t.size(0) && cos.size(1) == half, "rotary_embedding: cos/sin must be [T, d / 2]");
  if (t.scalar_type() == at::kFloat) {
    rotate<float>(t.data_ptr<float>(), cos.data_ptr<float>(), sin.data_ptr<float>(), t.size(0), t.size(1), half,
                  t.stride(0), t.stride(1));
  } else {
    rotate<bf16>(BF(t), cos.data_ptr<float>(), sin.data_ptr<float>(), t.size(0),
                          t.size(1), half, t.stride(0), t.stride(1));
  }
}

// In place on q and k (views into the QKV projection's output); cos, sin float32.
void rotary_embedding(at::Tensor q, at::Tensor k, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(q.scalar_type() == k.scalar_type() &&
                  (q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16),
              "rotary_embedding (CPU) takes float32 or bfloat16 q and k");
  const at::Tensor c = cos.to(at::kFloat).contiguous(), s = sin.to(at::kFloat).contiguous();
  rotary_one(q, c, s);
  rotary_one(k, c, s);
}

template <typename T>
void silu_mul_row(const T* __restrict gate, const T* __restrict up, T* __restrict out, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, bf16>) {
    for (; i + 16 <= n; i += 16) {
      const vf16 g = load16(gate + i);
      const vf16 act = round16(g * reciprocal16(1.0f + exp16(0.0f - g)));
      store16(out + i, act * load16(up + i));
    }
  }
#endif
#pragma omp simd
  for (int64_t j = i; j < n; ++j) {
    const float g = to_float(gate[j]);
    const float e = softmax_exp(-g);  // clamped to exp(+-87), where silu is g or 0 to float precision
    const float act = round_to(g / (1.0f + e), T());
    from_float(act * to_float(up[j]), out + j);
  }
}

template <typename T>
void silu_mul_kernel(const T* x, T* out, int64_t rows, int64_t inter, int64_t row_stride) {
  at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      silu_mul_row(x + r * row_stride, x + r * row_stride + inter, out + r * inter, inter);
    }
  });
}

at::Tensor silu_and_mul(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "silu_and_mul (CPU) takes float32 or bfloat16, got ", x.scalar_type());
  const at::Tensor xc = x.contiguous();
  const int64_t width = x.size(-1), inter = width / 2;
  TORCH_CHECK(width % 2 == 0, "silu_and_mul: the last dimension must be even");
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = inter;
  at::Tensor out = at::empty(shape, x.options());
  const int64_t rows = width == 0 ? 0 : x.numel() / width;
  if (x.scalar_type() == at::kFloat) {
    silu_mul_kernel<float>(xc.data_ptr<float>(), out.data_ptr<float>(), rows, inter, width);
  } else {
    silu_mul_kernel<bf16>(BF(xc), BF(out), rows, inter, width);
  }
  return out;
}

// ---- KV cache write: key/value [T, kv_heads, head_dim] (strided views of the QKV output are read in
// place) copied to slot_mapping[t] of the paged caches; a negative slot (padding) writes nothing. One op
// where the torch path takes five (slot cast, mask, all(), two index_copy_) per layer.

template <typename T>
void cache_rows(const T* src, T* cache, const int64_t* slots, int64_t tokens, int64_t heads, int64_t head_dim,
                int64_t stride_t, int64_t stride_h) {
  const int64_t row = heads * head_dim;
  for (int64_t t = 0; t < tokens; ++t) {
    if (slots[t] < 0) continue;
    T* dst = cache + slots[t] * row;
    for (int64_t h = 0; h < heads; ++h) {
      std::memcpy(dst + h * head_dim, src + t * stride_t + h * stride_h, head_dim * sizeof(T));
    }
  }
}

void reshape_and_cache(const at::Tensor& key, const at::Tensor& value, at::Tensor k_cache, at::Tensor v_cache,
                       const at::Tensor& slot_mapping) {
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.is_contiguous() &&
                  v_cache.is_contiguous(),
              "k_cache and v_cache must both be contiguous [num_blocks, block_size, num_kv_heads, head_dim]");
  TORCH_CHECK(key.dim() == 3 && value.sizes() == key.sizes() && key.stride(2) == 1 && value.stride(2) == 1,
              "key and value must be [T, num_kv_heads, head_dim] with unit stride in head_dim");
  TORCH_CHECK(key.size(1) == k_cache.size(2) && key.size(2) == k_cache.size(3), "key/value heads do not match the cache");
  TORCH_CHECK(key.scalar_type() == k_cache.scalar_type() && value.scalar_type() == k_cache.scalar_type() &&
                  v_cache.scalar_type() == k_cache.scalar_type(),
              "key, value and the caches must share a dtype");
  TORCH_CHECK(k_cache.scalar_type() == at::kFloat || k_cache.scalar_type() == at::kBFloat16,
              "reshape_and_cache (CPU) takes float32 or bfloat16");
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.size(0) == key.size(0), "slot_mapping must be [T]");
  const at::Tensor slots = slot_mapping.to(at::kLong).contiguous();
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t tokens = key.size(0), num_slots = k_cache.size(0) * k_cache.size(1);
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK(sp[t] < num_slots, "slot ", sp[t], " is outside the cache (", num_slots, " slots)");
  }
  const int64_t heads = key.size(1), d = key.size(2);
  if (k_cache.scalar_type() == at::kFloat) {
    cache_rows<float>(key.data_ptr<float>(), k_cache.data_ptr<float>(), sp, tokens, heads, d, key.stride(0), key.stride(1));
    cache_rows<float>(value.data_ptr<float>(), v_cache.data_ptr<float>(), sp, tokens, heads, d, value.stride(0),
                      value.stride(1));
  } else {
    cache_rows<bf16>(BF(key), BF(k_cache), sp, tokens, heads, d, key.stride(0), key.stride(1));
    cache_rows<bf16>(BF(value), BF(v_cache), sp, tokens, heads, d, value.stride(0), value.stride(1));
  }
}

// ---- Greedy choice and log-normalizer of logit rows: what sampling needs of a row with no processors (its
// token and that token's log-probability, scores[id] - lse), in two reads of the row where torch took a
// float32 copy, a log-softmax written out in full and an argmax (~2 ms per step at 32 x 49k bfloat16 rows).

template <typename T>
void argmax_lse_row(const T* x, int64_t n, int64_t* id_out, float* lse_out) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  // Pass 1: per lane the first maximum and its index (strict >, indices rising), then the lanes merged.
  vf16 best = vf16{} - kInf;
  vi16 where = vi16{};
  const vi16 iota = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const vf16 v = load16(x + i);
    const vi16 up = v > best;
    best = up ? v : best;
    where = up ? iota + static_cast<int32_t>(i) : where;
  }
  float m = -kInf;
  int64_t id = 0;
  for (int lane = 0; lane < 16; ++lane) {
    if (best[lane] > m || (best[lane] == m && where[lane] < id)) {
      m = best[lane];
      id = where[lane];
    }
  }
  for (; i < n; ++i) {
    const float v = to_float(x[i]);
    if (v > m) {
      m = v;
      id = i;
    }
  }
  // Pass 2: the sum of exp(x - max); a term below e^-87 counts as e^-87, beside the max's own 1. Summed in
  // blocks whose totals add in double: one float sum over 49k terms drifted 1e-4 (8 lanes, AVX2).
  float sum = 0.0f;
  if (m > -kInf) {
    double total = 0.0;
    for (int64_t b = 0; b < n; b += 1024) {
      const int64_t e = std::min<int64_t>(n, b + 1024);
      float part = 0.0f;
#pragma omp simd reduction(+ : part)
      for (int64_t j = b; j < e; ++j) part += softmax_exp(to_float(x[j]) - m);
      total += part;
    }
    sum = static_cast<float>(total);
  }
  if (m == -kInf || std::isnan(sum)) {  // torch.argmax takes the first NaN; such a row has no normalizer
    for (int64_t j = 0; j < n; ++j) {
      if (std::isnan(to_float(x[j]))) {
        *id_out = j;
        *lse_out = std::numeric_limits<float>::quiet_NaN();
        return;
      }
    }
  }
  *id_out = id;  // every score -inf (or none): 0, as torch.argmax; the normalizer is -inf
  if (m == -kInf) {
    *lse_out = -kInf;
    return;
  }
  *lse_out = m + std::log(sum);
}

std::tuple<at::Tensor, at::Tensor> argmax_logsumexp(const at::Tensor& scores) {
  TORCH_CHECK(scores.dim() == 2, "argmax_logsumexp takes [rows, vocab] scores");
  TORCH_CHECK(scores.scalar_type() == at::kFloat || scores.scalar_type() == at::kBFloat16,
              "argmax_logsumexp (CPU) takes float32 or bfloat16, got ", scores.scalar_type());
  const at::Tensor x = scores.contiguous();
  const int64_t rows = x.size(0), n = x.size(1);
  TORCH_CHECK(n < std::numeric_limits<int32_t>::max(), "argmax_logsumexp: rows of at most 2^31 - 1 scores");
  at::Tensor ids = at::empty({rows}, x.options().dtype(at::kLong));
  at::Tensor lse = at::empty({rows}, x.options().dtype(at::kFloat));
  int64_t* id_ptr = ids.data_ptr<int64_t>();
  float* lse_ptr = lse.data_ptr<float>();
  const bool is_bf16 = x.scalar_type() == at::kBFloat16;
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (is_bf16) {
        argmax_lse_row<bf16>(BF(x) + r * n, n, id_ptr + r, lse_ptr + r);
      } else {
        argmax_lse_row<float>(x.data_ptr<float>() + r * n, n, id_ptr + r, lse_ptr + r);
      }
    }
  });
  return {ids, lse};
}

// ---- Matmuls of one to four rows (a decode step at small batch, a prompt's last-token logits): y = x W^T + b over
// the plain [out, in] weight, which such a matmul streams once from DRAM and barely computes on. oneDNN runs
// them at four rows from its packed copy (linear.MIN_ROWS) and streamed the SmolLM2-135M shapes at ~19 GB/s on
// Sapphire Rapids. Here each thread walks its range of output rows in memory order, one sequential stream
// prefetched 4 KB ahead (the hardware prefetchers stop at each 4 KB page and ramp up again), with 16 dot
// products in registers summed by one reduction tree: 27 GB/s float32 and 29 GB/s bfloat16 (VDPBF16PS pairs)
// at one row, 24-25 GB/s at four. linear.py times both once per model and keeps the faster.
constexpr int64_t kMaxLinearRows = 4;
constexpr int64_t kLinearAhead = 4096;

template <typename T, int M>
void linear_rows_kernel(const T* x, const T* w, const T* bias, T* y, int64_t K, int64_t N) {
  constexpr int NO = 16 / M;                         // output rows per block: M * NO = 16 sums in flight
  constexpr int64_t L = std::is_same_v<T, bf16> ? 32 : 16;  // elements per 64-byte vector
  const int64_t body = K - K % L;
  auto dot = [&](vf16 acc, const T* a, const T* b) {
    if constexpr (std::is_same_v<T, bf16>) {
      return dot_pairs(acc, load_pairs(a), load_pairs(b));
    } else {
      return acc + load16(a) * load16(b);
    }
  };
  // The elements past the last whole vector, and the bias, for output row n of input row m.
  auto rest = [&](int m, int64_t n) {
    float s = bias != nullptr ? to_float(bias[n]) : 0.0f;
    for (int64_t k = body; k < K; ++k) s += to_float(x[m * K + k]) * to_float(w[n * K + k]);
    return s;
  };
  const int64_t blocks = N / NO;
  at::parallel_for(0, blocks + 1, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * NO;
      if (b == blocks) {  // the last N % NO output rows, one at a time
        for (int64_t n = n0; n < N; ++n) {
          for (int m = 0; m < M; ++m) {
            vf16 acc = vf16{};
            for (int64_t k = 0; k < body; k += L) acc = dot(acc, w + n * K + k, x + m * K + k);
            float s = rest(m, n);
            for (int lane = 0; lane < 16; ++lane) s += acc[lane];
            from_float(s, y + m * N + n);
          }
        }
        continue;
      }
      vf16 acc[16];
      for (int i = 0; i < 16; ++i) acc[i] = vf16{};
      for (int o = 0; o < NO; ++o) {
        for (int64_t k = 0; k < body; k += L) {
          __builtin_prefetch(reinterpret_cast<const char*>(w + (n0 + o) * K + k) + kLinearAhead, 0, 2);
          for (int m = 0; m < M; ++m) acc[m * NO + o] = dot(acc[m * NO + o], w + (n0 + o) * K + k, x + m * K + k);
        }
      }
      const vf16 sums = row_sums16(acc);
      for (int m = 0; m < M; ++m) {
        for (int o = 0; o < NO; ++o) from_float(sums[m * NO + o] + rest(m, n0 + o), y + m * N + n0 + o);
      }
    }
  });
}

at::Tensor linear_rows(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "linear_rows takes x [rows, in] and weight [out, in]");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= kMaxLinearRows, "linear_rows takes 1 to ", kMaxLinearRows, " rows");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "linear_rows takes float32 or bfloat16 x and weight of one dtype");
  TORCH_CHECK(weight.is_contiguous(), "linear_rows takes a contiguous weight");
  const at::Tensor xc = x.contiguous();
  at::Tensor b;
  if (bias.has_value()) {
    b = bias->contiguous();
    TORCH_CHECK(b.scalar_type() == x.scalar_type() && b.numel() == weight.size(0), "bias must be [out], x's dtype");
  }
  const int64_t K = x.size(1), N = weight.size(0);
  at::Tensor y = at::empty({x.size(0), N}, x.options());
  with_count(static_cast<int>(x.size(0)), [&](auto rows) {
    constexpr int M = decltype(rows)::value;
    if (x.scalar_type() == at::kBFloat16) {
      linear_rows_kernel<bf16, M>(BF(xc), BF(weight), b.defined() ? BF(b) : nullptr, BF(y), K, N);
    } else {
      linear_rows_kernel<float, M>(xc.data_ptr<float>(), weight.data_ptr<float>(),
                                   b.defined() ? b.data_ptr<float>() : nullptr, y.data_ptr<float>(), K, N);
    }
  });
  return y;
}

// ---- bf16 matmuls of up to 32 rows with AMX (a decode step's batch): y = x W^T + b over the plain [out, in]
// weight, still one pass over W from DRAM, which oneDNN's AMX kernels stream at ~19 GB/s at 32 rows from their
// packed copy (Sapphire Rapids, SmolLM2-135M's shapes: 13.6-14.0 ms a step's matmuls) where this kernel reads
// ~24 GB/s (11.0-11.5 ms). It computes y^T = W x^T, so W's rows load as AMX "A" tiles straight from the plain
// layout (16 rows x 32 columns, strided by the row), and x (a few KB) is rearranged once per call into the
// pair-interleaved "B" tiles TDPBF16PS multiplies by: tile (m block, k chunk) holds x[m][k] for 16 rows m and 32
// columns k, as 16 rows of (k pair) x 16 m pairs -- the 16 x 16 transpose of x's 32-bit pairs. Each thread walks
// its range of 32-row blocks of W in memory order (the next block prefetched into L2 as the K loop goes), with
// two A, up to two B and four C tiles (of the eight), so every W byte is read once for all the rows. Products
// are exact in float32 and summed in float32 as oneDNN's AMX kernels sum them; the bias is added before the
// rounding to bf16. Takes K % 32 == 0 and N % 16 == 0 (every shape the models here have); linear.py checks.
constexpr int64_t kMaxTileRows = 32;

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
// Linux hands a thread AMX state only after the process asks (ARCH_REQ_XCOMP_PERM for XTILEDATA); without it
// the first tile instruction faults. oneDNN asks too; asking twice is harmless.
bool amx_permitted() {
  static const bool ok = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return ok;
}

struct alignas(64) TileConfig {  // palette 1: every tile 16 rows of 64 bytes
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
  TileConfig() {
    for (int t = 0; t < 8; ++t) colsb[t] = 64, rows[t] = 16;
  }
};

// C tiles 4..4+MB*NBK-1 (nb-major) += A tiles 0..NBK-1 (W blocks) x B tiles 2..2+MB-1 (x blocks), over K.
template <int NBK, int MB>
inline void tile_block(const bf16* w, int64_t K, const bf16* xb, int64_t mb, const char* next, int64_t next_bytes) {
  const int64_t KC = K / 32;
  const int64_t per_chunk = (next_bytes / KC + 63) / 64 * 64;
  _tile_zero(4);
  if constexpr (MB == 2) _tile_zero(5);
  if constexpr (NBK == 2) _tile_zero(6);
  if constexpr (NBK == 2 && MB == 2) _tile_zero(7);
  for (int64_t kc = 0; kc < KC; ++kc) {
    if (next != nullptr) {
      for (int64_t off = kc * per_chunk; off < std::min((kc + 1) * per_chunk, next_bytes); off += 64)
        __builtin_prefetch(next + off, 0, 2);
    }
    _tile_loadd(0, w + kc * 32, K * 2);
    if constexpr (NBK == 2) _tile_loadd(1, w + 16 * K + kc * 32, K * 2);
    _tile_loadd(2, xb + (mb * KC + kc) * 512, 64);
    if constexpr (MB == 2) _tile_loadd(3, xb + ((mb + 1) * KC + kc) * 512, 64);
    _tile_dpbf16ps(4, 0, 2);
    if constexpr (MB == 2) _tile_dpbf16ps(5, 0, 3);
    if constexpr (NBK == 2) _tile_dpbf16ps(6, 1, 2);
    if constexpr (NBK == 2 && MB == 2) _tile_dpbf16ps(7, 1, 3);
  }
}

// C tile (n block, m block) [16 n][16 m] float32 -> y[m][n], + bias, rounded to bf16; rows past M skipped.
inline void store_tile(const float* c, const bf16* bias, bf16* y, int64_t M, int64_t N, int64_t n0, int64_t m0) {
  vf16 v[16];
  for (int i = 0; i < 16; ++i) v[i] = load16(c + i * 16);
  transpose16(v);
  const vf16 b = bias != nullptr ? load16(bias + n0) : vf16{};
  for (int i = 0; i < 16 && m0 + i < M; ++i) {
    const __m256bh h = _mm512_cvtneps_pbh((__m512)(v[i] + b));
    std::memcpy(y + (m0 + i) * N + n0, &h, sizeof(h));
  }
}

void linear_tiles_kernel(const bf16* x, const bf16* w, const bf16* bias, bf16* y, int64_t M, int64_t K, int64_t N) {
  const int64_t KC = K / 32, MBS = (M + 15) / 16;
  thread_local std::vector<bf16> xb;  // B tiles [m block][k chunk][16 pairs][16 m][2]; a few KB, kept
  xb.resize(MBS * 16 * K);
  for (int64_t mb = 0; mb < MBS; ++mb) {
    for (int64_t kc = 0; kc < KC; ++kc) {
      vf16 v[16];  // 32-bit lanes: bf16 pairs
      for (int i = 0; i < 16; ++i)
        v[i] = mb * 16 + i < M ? (vf16)load_pairs(x + (mb * 16 + i) * K + kc * 32) : vf16{};
      transpose16(v);
      float* tile = reinterpret_cast<float*>(xb.data() + (mb * KC + kc) * 512);
      for (int p = 0; p < 16; ++p) store16(tile + p * 16, v[p]);
    }
  }
  const bf16* xt = xb.data();
  const int64_t blocks = (N + 31) / 32;  // the last one 16 rows when N % 32 == 16
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    const TileConfig config;
    _tile_loadconfig(&config);
    alignas(64) float c[4][256];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * 32;
      const bool pair = n0 + 32 <= N;
      const char* next = b + 1 < b1 ? reinterpret_cast<const char*>(w + (n0 + 32) * K) : nullptr;
      const int64_t next_bytes = next == nullptr ? 0 : std::min<int64_t>(32, N - n0 - 32) * K * 2;
      for (int64_t mb = 0; mb < MBS; mb += 2) {
        const bool two = mb + 1 < MBS;
        const char* ahead = mb == 0 ? next : nullptr;  // the later m blocks read W from L2
        if (pair && two) tile_block<2, 2>(w + n0 * K, K, xt, mb, ahead, next_bytes);
        else if (pair) tile_block<2, 1>(w + n0 * K, K, xt, mb, ahead, next_bytes);
        else if (two) tile_block<1, 2>(w + n0 * K, K, xt, mb, ahead, next_bytes);
        else tile_block<1, 1>(w + n0 * K, K, xt, mb, ahead, next_bytes);
        _tile_stored(4, c[0], 64);
        if (two) _tile_stored(5, c[1], 64);
        if (pair) _tile_stored(6, c[2], 64);
        if (pair && two) _tile_stored(7, c[3], 64);
        for (int nb = 0; nb < (pair ? 2 : 1); ++nb)
          for (int j = 0; j < (two ? 2 : 1); ++j)
            store_tile(c[nb * 2 + j], bias, y, M, N, n0 + nb * 16, (mb + j) * 16);
      }
    }
    _tile_release();
  });
  release_if_large(xb);
}
#else
bool amx_permitted() { return false; }
void linear_tiles_kernel(const bf16*, const bf16*, const bf16*, bf16*, int64_t, int64_t, int64_t) {
  TORCH_CHECK(false, "linear_tiles needs a build with AMX (this CPU or compiler has none)");
}
#endif

bool has_linear_tiles() { return amx_permitted(); }

at::Tensor linear_tiles(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(amx_permitted(), "linear_tiles needs AMX, which this CPU, kernel or build lacks");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "linear_tiles takes x [rows, in] and weight [out, in]");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= kMaxTileRows, "linear_tiles takes 1 to ", kMaxTileRows, " rows");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16,
              "linear_tiles takes bfloat16 x and weight");
  TORCH_CHECK(weight.is_contiguous(), "linear_tiles takes a contiguous weight");
  const int64_t K = x.size(1), N = weight.size(0);
  TORCH_CHECK(K % 32 == 0 && N % 16 == 0, "linear_tiles takes in % 32 == 0 and out % 16 == 0, got ", K, " and ", N);
  const at::Tensor xc = x.contiguous();
  at::Tensor b;
  if (bias.has_value()) {
    b = bias->contiguous();
    TORCH_CHECK(b.scalar_type() == at::kBFloat16 && b.numel() == N, "bias must be [out], bfloat16");
  }
  at::Tensor y = at::empty({x.size(0), N}, x.options());
  linear_tiles_kernel(BF(xc), BF(weight), b.defined() ? BF(b) : nullptr, BF(y), x.size(0), K, N);
  return y;
}

}  // namespace

TORCH_LIBRARY(spindle_cpu, m) {
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor context_lens, float scale, int window=0, float softcap=0.0) -> Tensor");
  m.impl("paged_decode_attention", c10::DispatchKey::CPU, TORCH_FN(paged_decode_attention));
  m.def("attention_rows(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor? row_seqs, "
        "Tensor row_lens, float scale, int window=0, float softcap=0.0) -> Tensor");
  m.impl("attention_rows", c10::DispatchKey::CPU, TORCH_FN(attention_rows));
  m.def("rms_norm(Tensor x, Tensor weight, float eps, Tensor? residual) -> (Tensor, Tensor)");
  m.impl("rms_norm", c10::DispatchKey::CPU, TORCH_FN(rms_norm));
  m.def("rotary_embedding(Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin) -> ()");
  m.impl("rotary_embedding", c10::DispatchKey::CPU, TORCH_FN(rotary_embedding));
  m.def("silu_and_mul(Tensor x) -> Tensor");
  m.impl("silu_and_mul", c10::DispatchKey::CPU, TORCH_FN(silu_and_mul));
  m.def("reshape_and_cache(Tensor key, Tensor value, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()");
  m.impl("reshape_and_cache", c10::DispatchKey::CPU, TORCH_FN(reshape_and_cache));
  m.def("argmax_logsumexp(Tensor scores) -> (Tensor, Tensor)");
  m.impl("argmax_logsumexp", c10::DispatchKey::CPU, TORCH_FN(argmax_logsumexp));
  m.def("linear_rows(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.impl("linear_rows", c10::DispatchKey::CPU, TORCH_FN(linear_rows));
  m.def("linear_tiles(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.impl("linear_tiles", c10::DispatchKey::CPU, TORCH_FN(linear_tiles));
  m.def("has_linear_tiles() -> bool", TORCH_FN(has_linear_tiles));
}
