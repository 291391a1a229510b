// CPU kernels of the fused Dual Attention ops (OpenMP over rows); bound in csrc/module.cpp.
// No FP-trap semantics in this file: lets GCC if-convert (and so vectorise) the
// clamps of exp_acc; results are unchanged (IEEE rounding is kept).
#pragma GCC optimize("no-trapping-math")
#include "attention/attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "attention/attention_math.h"
#include "common/check.h"

namespace isg {
namespace attention {
namespace {

// ----------------------------------------------------------------------------- storage types

struct Half { uint16_t bits; };
struct BFloat16 { uint16_t bits; };

inline float float_from_bits(uint32_t w) { float f; std::memcpy(&f, &w, 4); return f; }
inline uint32_t bits_from_float(float f) { uint32_t w; std::memcpy(&w, &f, 4); return w; }

// IEEE half <-> float, round to nearest even (after Maratyszcza's FP16 library).
inline float half_to_float(uint16_t h) {
  const uint32_t w = uint32_t(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = float_from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = float_from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
  return float_from_bits(sign | (two_w < (1u << 27) ? bits_from_float(denormalized) : bits_from_float(normalized)));
}

inline uint16_t float_to_half(float f) {
  float base = (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = bits_from_float(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = float_from_bits((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = bits_from_float(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return uint16_t((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

inline float bfloat16_to_float(uint16_t b) { return float_from_bits(uint32_t(b) << 16); }

inline uint16_t float_to_bfloat16(float f) {
  const uint32_t w = bits_from_float(f);
  if (std::isnan(f)) return uint16_t((w >> 16) | 0x0040u);
  return uint16_t((w + 0x7FFFu + ((w >> 16) & 1u)) >> 16);  // round to nearest even
}

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

inline float load(const float* p) { return *p; }
inline double load(const double* p) { return *p; }
inline float load(const Half* p) { return half_to_float(p->bits); }
inline float load(const BFloat16* p) { return bfloat16_to_float(p->bits); }
inline void store(float* p, float x) { *p = x; }
inline void store(double* p, double x) { *p = x; }
inline void store(Half* p, float x) { p->bits = float_to_half(x); }
inline void store(BFloat16* p, float x) { p->bits = float_to_bfloat16(x); }

// ----------------------------------------------------------------------------- kernels
// A row is one (m, c) of [M, C, L]. Plus-form kernels handle rows [r0, r1); paper-form kernels
// handle batches [m0, m1) (their small operand is shared by the C rows of a batch, and its
// gradient sums over them). `parallel_for` spreads blocks of units over up to `threads` OpenMP
// threads. On x86-64 the kernels are cloned for AVX-512 and AVX2 and the best clone is picked
// at load time (the default build targets SSE2 only).

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ISG_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ISG_CLONES
#endif

template <typename F>
void parallel_for(int64_t units, int64_t unit_size, int threads, F&& kernel) {
  const int64_t block = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, unit_size));  // ~16k elements per task
  const int64_t blocks = (units + block - 1) / block;
#ifdef _OPENMP
  if (threads <= 0) threads = omp_get_max_threads();
#endif
  // A thread joins only for >= 2^18 elements (~0.3 ms of the gated op's exp-bound work): waking one
  // that sleeps (OMP_WAIT_POLICY=PASSIVE) costs ~10 us on an idle core and up to milliseconds on a
  // busy one. At 2^20 the gated op at M = 512 patches, C = 64, L = 16 (2^19 elements) ran on one
  // thread and missed 2x eager on 2 idle cores (1.62x; 2.52x with 2^18, bench_attention.py).
  threads = int(std::min<int64_t>({threads, blocks, std::max<int64_t>(1, units * unit_size >> 18)}));
  if (threads <= 1) return kernel(0, units);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t u0 = 0; u0 < units; u0 += block) kernel(u0, std::min(units, u0 + block));
}

// gated_hadamard forward; plus form: rows [r0, r1), q [rows]; paper form: batches [r0, r1), q [M, L].
template <bool kPaper, typename T>
ISG_CLONES void gated_forward_units(const T* q, const T* k, const T* v, T* out, int64_t u0, int64_t u1, const Shape& s) {
  using acc_t = typename Acc<T>::type;
  const int64_t length = s.length, rows_per_unit = kPaper ? s.channels : 1;
  for (int64_t u = u0; u < u1; ++u) {
    for (int64_t c = 0; c < rows_per_unit; ++c) {
      const int64_t base = (u * rows_per_unit + c) * length;
      const T* qu = kPaper ? q + u * length : q;  // paper: q[m, 0, :]
      const acc_t qr = kPaper ? acc_t(0) : acc_t(load(q + u));
#pragma omp simd
      for (int64_t j = 0; j < length; ++j) {
        const acc_t qj = kPaper ? acc_t(load(qu + j)) : qr;
        store(out + base + j, gated_forward<acc_t>(qj, load(k + base + j), load(v + base + j)));
      }
    }
  }
}

// Plus form: dL/dq[r] = sum_j over the row.
template <typename T>
ISG_CLONES void gated_backward_rows(const T* grad, const T* q, const T* k, const T* v, T* grad_q, T* grad_k, T* grad_v,
                                    int64_t r0, int64_t r1, int64_t length) {
  using acc_t = typename Acc<T>::type;
  for (int64_t r = r0; r < r1; ++r) {
    const acc_t qr = load(q + r);
    const int64_t base = r * length;
    acc_t dq = 0;
#pragma omp simd reduction(+ : dq)
    for (int64_t j = 0; j < length; ++j) {
      acc_t gk, gv;
      dq += gated_backward<acc_t>(qr, load(k + base + j), load(v + base + j), load(grad + base + j), gk, gv);
      store(grad_k + base + j, gk);
      store(grad_v + base + j, gv);
    }
    store(grad_q + r, dq);
  }
}

// Paper form: dL/dq[m, j] = sum_c over the batch's channels.
template <typename T>
ISG_CLONES void gated_backward_batches(const T* grad, const T* q, const T* k, const T* v, T* grad_q, T* grad_k, T* grad_v,
                                       int64_t m0, int64_t m1, const Shape& s) {
  using acc_t = typename Acc<T>::type;
  const int64_t length = s.length;
  std::vector<acc_t> qm(length), dq(length);
  for (int64_t m = m0; m < m1; ++m) {
    for (int64_t j = 0; j < length; ++j) qm[j] = load(q + m * length + j), dq[j] = 0;
    for (int64_t c = 0; c < s.channels; ++c) {
      const int64_t base = (m * s.channels + c) * length;
#pragma omp simd
      for (int64_t j = 0; j < length; ++j) {
        acc_t gk, gv;
        dq[j] += gated_backward<acc_t>(qm[j], load(k + base + j), load(v + base + j), load(grad + base + j), gk, gv);
        store(grad_k + base + j, gk);
        store(grad_v + base + j, gv);
      }
    }
    for (int64_t j = 0; j < length; ++j) store(grad_q + m * length + j, dq[j]);
  }
}

// exp(logit_j - max) of one row into e[0:length]; returns their sum.
template <typename T, typename acc_t>
inline acc_t row_exp(const T* logits, int64_t length, acc_t* e) {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < length; ++j) m = std::max(m, acc_t(load(logits + j)));
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < length; ++j) {
    e[j] = exp_acc(acc_t(load(logits + j)) - m);
    sum += e[j];
  }
  return sum;
}

// Plus form, one row per loop (L > kShortRow).
template <typename T>
ISG_CLONES void softmax_forward_rows(const T* logits, const T* p, T* out, int64_t r0, int64_t r1, int64_t length) {
  using acc_t = typename Acc<T>::type;
  std::vector<acc_t> e(length);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t base = r * length;
    const acc_t sum = row_exp(logits + base, length, e.data());
    acc_t acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < length; ++j) acc += e[j] * acc_t(load(p + base + j));
    store(out + r, acc / sum);
  }
}

// Paper form: the softmax of logits[m, 0, :] once per batch, then one weighted sum per channel.
template <typename T>
ISG_CLONES void softmax_forward_batches(const T* logits, const T* p, T* out, int64_t m0, int64_t m1, const Shape& s) {
  using acc_t = typename Acc<T>::type;
  const int64_t length = s.length;
  std::vector<acc_t> w(length);
  for (int64_t m = m0; m < m1; ++m) {
    const acc_t inv = acc_t(1) / row_exp(logits + m * length, length, w.data());
    for (int64_t c = 0; c < s.channels; ++c) {
      const int64_t base = (m * s.channels + c) * length;
      acc_t acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t j = 0; j < length; ++j) acc += w[j] * acc_t(load(p + base + j));
      store(out + m * s.channels + c, acc * inv);
    }
  }
}

// Plus form backward, one row per loop.
template <typename T>
ISG_CLONES void softmax_backward_rows(const T* grad, const T* logits, const T* p, T* grad_logits, T* grad_p, int64_t r0, int64_t r1,
                                      int64_t length) {
  using acc_t = typename Acc<T>::type;
  std::vector<acc_t> e(length);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t base = r * length;
    const acc_t inv = acc_t(1) / row_exp(logits + base, length, e.data());
    acc_t out = 0;  // recomputed in acc_t: no rounding of the saved forward output
#pragma omp simd reduction(+ : out)
    for (int64_t j = 0; j < length; ++j) out += e[j] * acc_t(load(p + base + j));
    out *= inv;
    const acc_t g = load(grad + r);
#pragma omp simd
    for (int64_t j = 0; j < length; ++j) {
      acc_t gl, gp;
      softmax_sum_backward<acc_t>(e[j] * inv, acc_t(load(p + base + j)), out, g, gl, gp);
      store(grad_logits + base + j, gl);
      store(grad_p + base + j, gp);
    }
  }
}

// Paper form backward: with w = softmax(logits[m]) and dw_j = sum_c g_c p[c, j],
// dL/dp[c, j] = g_c w_j and dL/dlogits_j = w_j (dw_j - sum_i w_i dw_i).
template <typename T>
ISG_CLONES void softmax_backward_batches(const T* grad, const T* logits, const T* p, T* grad_logits, T* grad_p, int64_t m0,
                                         int64_t m1, const Shape& s) {
  using acc_t = typename Acc<T>::type;
  const int64_t length = s.length;
  std::vector<acc_t> w(length), dw(length);
  for (int64_t m = m0; m < m1; ++m) {
    const acc_t inv = acc_t(1) / row_exp(logits + m * length, length, w.data());
    for (int64_t j = 0; j < length; ++j) w[j] *= inv, dw[j] = 0;
    for (int64_t c = 0; c < s.channels; ++c) {
      const int64_t base = (m * s.channels + c) * length;
      const acc_t g = load(grad + m * s.channels + c);
#pragma omp simd
      for (int64_t j = 0; j < length; ++j) {
        dw[j] += g * acc_t(load(p + base + j));
        store(grad_p + base + j, g * w[j]);
      }
    }
    acc_t mean = 0;
    for (int64_t j = 0; j < length; ++j) mean += w[j] * dw[j];
    for (int64_t j = 0; j < length; ++j) store(grad_logits + m * length + j, w[j] * (dw[j] - mean));
  }
}

// Forward of softmax_spatial_sum on short rows (plus form, L <= kShortRow): one row per
// vector lane instead of one row per loop. A group of kGroup rows is transposed into
// [L][kGroup] buffers, so the max, exp and the sums run across rows with no horizontal
// reductions (these dominate when a row is a single vector: 2.5x faster at L = 16). The
// backward keeps one row per loop: its transposed write-back of two gradients costs more than it saves.
constexpr int64_t kShortRow = 32;
constexpr int kGroup = 16;

template <typename T, typename acc_t>
inline int load_group(const T* src, int64_t g0, int64_t r1, int64_t length, acc_t (*dst)[kGroup]) {
  const int n = int(std::min<int64_t>(kGroup, r1 - g0));
  for (int r = 0; r < kGroup; ++r)
    for (int64_t j = 0; j < length; ++j) dst[j][r] = r < n ? acc_t(load(src + (g0 + r) * length + j)) : acc_t(0);
  return n;
}

// e[j][r] = exp(logits - max) per row r of the group; returns 1 / sum in inv[r].
template <typename acc_t>
inline void group_softmax(acc_t (*e)[kGroup], int64_t length, acc_t* inv) {
  acc_t m[kGroup], sum[kGroup];
#pragma omp simd
  for (int r = 0; r < kGroup; ++r) m[r] = e[0][r], sum[r] = 0;
  for (int64_t j = 1; j < length; ++j) {
#pragma omp simd
    for (int r = 0; r < kGroup; ++r) m[r] = std::max(m[r], e[j][r]);
  }
  for (int64_t j = 0; j < length; ++j) {
#pragma omp simd
    for (int r = 0; r < kGroup; ++r) {
      e[j][r] = exp_acc(e[j][r] - m[r]);
      sum[r] += e[j][r];
    }
  }
#pragma omp simd
  for (int r = 0; r < kGroup; ++r) inv[r] = acc_t(1) / sum[r];
}

template <typename T>
ISG_CLONES void softmax_forward_short_rows(const T* logits, const T* p, T* out, int64_t r0, int64_t r1, int64_t length) {
  using acc_t = typename Acc<T>::type;
  acc_t e[kShortRow][kGroup], pt[kShortRow][kGroup], inv[kGroup], acc[kGroup];
  for (int64_t g0 = r0; g0 < r1; g0 += kGroup) {
    const int n = load_group(logits, g0, r1, length, e);
    load_group(p, g0, r1, length, pt);
    group_softmax(e, length, inv);
    for (int r = 0; r < kGroup; ++r) acc[r] = 0;
    for (int64_t j = 0; j < length; ++j) {
#pragma omp simd
      for (int r = 0; r < kGroup; ++r) acc[r] += e[j][r] * pt[j][r];
    }
    for (int r = 0; r < n; ++r) store(out + g0 + r, acc[r] * inv[r]);
  }
}

// ----------------------------------------------------------------------------- paper form, float32: 16-lane vectors
// In the paper form every channel row p[m, c, :] (L = S * S floats, 16 at S = 4) meets the same
// softmax weights w[m, :]: the forward is one dot product per row, the backward one axpy per row
// into dw. GCC lowers `omp simd reduction` over such a short row to a scalar loop over a stack
// array of lanes (~110 cycles a row, 5x torch.compile). Here a row is split into chunks of 16
// floats held in GCC / clang vector types (one AVX-512 register, two AVX2 ones), the last chunk
// zero-padded, and the forward sums the lanes of 16 rows at once with a transposing tree of
// two-source shuffles (30 shuffles and 15 adds for 16 outputs, no horizontal sum per row).
#if defined(__GNUC__)
#define ISG_VEC16 1
#pragma GCC diagnostic ignored "-Wpsabi"  // Vec16 is passed only between inlined helpers
typedef float Vec16 __attribute__((vector_size(64)));
#if defined(__clang__)
#define ISG_SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
typedef int32_t Lanes16 __attribute__((vector_size(64)));
#define ISG_SHUFFLE(a, b, ...) __builtin_shuffle(a, b, Lanes16{__VA_ARGS__})
#endif

inline Vec16 load16(const float* p) {
  Vec16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store16(float* p, Vec16 v) { std::memcpy(p, &v, sizeof v); }
inline Vec16 load_part(const float* p, int64_t n) {  // n < 16 floats, zero-padded
  Vec16 v = {};
  std::memcpy(&v, p, size_t(n) * sizeof(float));
  return v;
}
inline void store_part(float* p, Vec16 v, int64_t n) { std::memcpy(p, &v, size_t(n) * sizeof(float)); }

inline float lane_sum(Vec16 v) {
  float s = 0;
  for (int k = 0; k < 16; ++k) s += v[k];
  return s;
}

// Lane c of the result = the sum of the 16 lanes of rows[c]: each level adds the two halves of
// every group of lanes, packing two rows' partial sums into one vector.
inline Vec16 transpose_sum16(const Vec16* rows) {
  Vec16 h8[8], h4[4], h2[2];
  for (int i = 0; i < 8; ++i)  // lanes 0-7: row 2i, lanes 8-15: row 2i + 1 (8 partial sums each)
    h8[i] = ISG_SHUFFLE(rows[2 * i], rows[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
            ISG_SHUFFLE(rows[2 * i], rows[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int i = 0; i < 4; ++i)  // rows 4i .. 4i + 3, 4 partial sums each
    h4[i] = ISG_SHUFFLE(h8[2 * i], h8[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
            ISG_SHUFFLE(h8[2 * i], h8[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  for (int i = 0; i < 2; ++i)  // rows 8i .. 8i + 7, 2 partial sums each
    h2[i] = ISG_SHUFFLE(h4[2 * i], h4[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
            ISG_SHUFFLE(h4[2 * i], h4[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  return ISG_SHUFFLE(h2[0], h2[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         ISG_SHUFFLE(h2[0], h2[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

// e = exp(logits - max) in chunks of 16 (zero past L); returns 1 / sum(e). Same max as row_exp
// (NaN logits give NaN weights, an all -inf row NaN ones, as PyTorch's softmax).
inline float softmax_chunks(const float* logits, int64_t length, int64_t chunks, float* e) {
  const float inf = std::numeric_limits<float>::infinity();
  Vec16 m = {};
  m -= inf;
  for (int64_t v = 0; v < chunks; ++v) {
    const int64_t n = std::min<int64_t>(16, length - 16 * v);
    Vec16 x = n == 16 ? load16(logits + 16 * v) : load_part(logits + 16 * v, n);
    if (n < 16)
      for (int64_t k = n; k < 16; ++k) x[k] = -inf;
    m = m < x ? x : m;
  }
  float max = -inf;
  for (int k = 0; k < 16; ++k) max = std::max(max, m[k]);
#pragma omp simd
  for (int64_t j = 0; j < length; ++j) e[j] = exp_acc(logits[j] - max);
  for (int64_t j = length; j < 16 * chunks; ++j) e[j] = 0;
  Vec16 sum = {};
  for (int64_t v = 0; v < chunks; ++v) sum += load16(e + 16 * v);
  return 1.0f / lane_sum(sum);
}

// Dot product of row[0:length] with the zero-padded weights w: the 16 lanes, unsummed.
template <int kChunks>
inline Vec16 row_dot(const float* row, const float* w, int64_t full, int64_t rest) {
  Vec16 acc = {};
  for (int64_t v = 0; v < (kChunks ? kChunks : full); ++v) acc += load16(row + 16 * v) * load16(w + 16 * v);
  if (!kChunks && rest) acc += load_part(row + 16 * full, rest) * load16(w + 16 * full);
  return acc;
}

// kChunks: L = 16 * kChunks (chunk loops unrolled), or 0: any L.
template <int kChunks>
ISG_CLONES void softmax_forward_batches_vec(const float* logits, const float* p, float* out, int64_t m0, int64_t m1,
                                            const Shape& s) {
  const int64_t length = s.length, channels = s.channels, chunks = (length + 15) / 16;
  const int64_t full = length / 16, rest = length % 16;
  std::vector<float> w(16 * chunks);  // (a vector of Vec16 would lose their alignment: GCC drops it in template arguments)
  for (int64_t m = m0; m < m1; ++m) {
    const float inv = softmax_chunks(logits + m * length, length, chunks, w.data());
    const float* pm = p + m * channels * length;
    float* om = out + m * channels;
    for (int64_t c0 = 0; c0 < channels; c0 += 16) {
      const int64_t n = std::min<int64_t>(16, channels - c0);
      Vec16 dots[16];
      for (int64_t k = 0; k < 16; ++k)  // rows past C repeat the last one (ignored below)
        dots[k] = row_dot<kChunks>(pm + (c0 + std::min(k, n - 1)) * length, w.data(), full, rest);
      const Vec16 sums = transpose_sum16(dots) * inv;
      if (n == 16)
        store16(om + c0, sums);
      else
        store_part(om + c0, sums, n);
    }
  }
}

// With w = softmax(logits[m]) and dw_j = sum_c g_c p[c, j]: dL/dp[c, j] = g_c w_j and
// dL/dlogits_j = w_j (dw_j - sum_i w_i dw_i); the chunks of dw stay in registers over the C rows.
template <int kChunks>
ISG_CLONES void softmax_backward_batches_vec(const float* grad, const float* logits, const float* p, float* grad_logits,
                                             float* grad_p, int64_t m0, int64_t m1, const Shape& s) {
  const int64_t length = s.length, channels = s.channels, chunks = (length + 15) / 16;
  const int64_t full = length / 16, rest = length % 16;
  std::vector<float> w(16 * chunks), dw(16 * chunks);
  for (int64_t m = m0; m < m1; ++m) {
    const float inv = softmax_chunks(logits + m * length, length, chunks, w.data());
    for (int64_t j = 0; j < length; ++j) w[j] *= inv;
    if constexpr (kChunks > 0) {  // dw in registers, kLanes partial sums each (a chain of FMAs per chunk would wait on their latency)
      constexpr int kLanes = kChunks == 1 ? 4 : kChunks == 2 ? 2 : 1;
      Vec16 wv[kChunks], dwv[kLanes][kChunks] = {};
      for (int v = 0; v < kChunks; ++v) wv[v] = load16(w.data() + 16 * v);
      const float* gm = grad + m * channels;
      const float* pm = p + m * channels * length;
      float* grad_pm = grad_p + m * channels * length;
      int64_t c = 0;
      for (; c + kLanes <= channels; c += kLanes)
        for (int lane = 0; lane < kLanes; ++lane)
          for (int v = 0; v < kChunks; ++v) {
            dwv[lane][v] += gm[c + lane] * load16(pm + (c + lane) * length + 16 * v);
            store16(grad_pm + (c + lane) * length + 16 * v, gm[c + lane] * wv[v]);
          }
      for (; c < channels; ++c)
        for (int v = 0; v < kChunks; ++v) {
          dwv[0][v] += gm[c] * load16(pm + c * length + 16 * v);
          store16(grad_pm + c * length + 16 * v, gm[c] * wv[v]);
        }
      for (int v = 0; v < kChunks; ++v) {
        Vec16 sum = dwv[0][v];
        for (int lane = 1; lane < kLanes; ++lane) sum += dwv[lane][v];
        store16(dw.data() + 16 * v, sum);
      }
    } else {
      std::fill(dw.begin(), dw.end(), 0.0f);
      for (int64_t c = 0; c < channels; ++c) {
        const float g = grad[m * channels + c];
        const float* row = p + (m * channels + c) * length;
        float* grad_row = grad_p + (m * channels + c) * length;
        for (int64_t v = 0; v < full; ++v) {
          store16(dw.data() + 16 * v, load16(dw.data() + 16 * v) + g * load16(row + 16 * v));
          store16(grad_row + 16 * v, g * load16(w.data() + 16 * v));
        }
        if (rest) {
          store16(dw.data() + 16 * full, load16(dw.data() + 16 * full) + g * load_part(row + 16 * full, rest));
          store_part(grad_row + 16 * full, g * load16(w.data() + 16 * full), rest);
        }
      }
    }
    Vec16 wdw = {};
    for (int64_t v = 0; v < chunks; ++v) wdw += load16(w.data() + 16 * v) * load16(dw.data() + 16 * v);  // padding: 0 * 0
    const float mean = lane_sum(wdw);
#pragma omp simd
    for (int64_t j = 0; j < length; ++j) grad_logits[m * length + j] = w[j] * (dw[j] - mean);
  }
}

// Runs kernel(std::integral_constant<int, kChunks>) with kChunks = L / 16 for L = 16, 32, 64, else 0.
template <typename F>
void with_chunks(int64_t length, F&& kernel) {
  switch (length) {
    case 16: return kernel(std::integral_constant<int, 1>{});
    case 32: return kernel(std::integral_constant<int, 2>{});
    case 64: return kernel(std::integral_constant<int, 4>{});
    default: return kernel(std::integral_constant<int, 0>{});
  }
}
#endif  // __GNUC__

// Outputs of [M, C, L] that a kernel writes whole: transparent huge pages are asked for (Linux;
// effective where THP is in `madvise` mode, the usual default). A fresh 32 MB tensor otherwise
// takes 8192 first-touch page faults, which cost more than the kernel's own work: softmax backward
// at M = 4096, C = 128, L = 16 took 48-52 ms a step with them, 38-47 ms with huge pages
// (torch.compile 46 ms). A hint: failures are ignored, memory already touched is unchanged.
void advise_huge_pages(void* data, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (data == nullptr || bytes < int64_t(2 * kHuge)) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + uintptr_t(bytes)) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
}

}  // namespace

// ----------------------------------------------------------------------------- public CPU entry points

void gated_hadamard_forward_cpu(const void* q, const void* k, const void* v, void* out, Shape s, DType dtype, int threads) {
  check_args("gated_hadamard_forward_cpu", s, {q, k, v, out});
  if (s.batch * s.channels * s.length == 0) return;
  dispatch<Half, BFloat16>(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T *qq = static_cast<const T*>(q), *kk = static_cast<const T*>(k), *vv = static_cast<const T*>(v);
    T* o = static_cast<T*>(out);
    advise_huge_pages(o, s.batch * s.channels * s.length * int64_t(sizeof(T)));
    if (s.shared_over_channels)
      parallel_for(s.batch, s.channels * s.length, threads,
                   [&](int64_t m0, int64_t m1) { gated_forward_units<true>(qq, kk, vv, o, m0, m1, s); });
    else
      parallel_for(s.batch * s.channels, s.length, threads,
                   [&](int64_t r0, int64_t r1) { gated_forward_units<false>(qq, kk, vv, o, r0, r1, s); });
  });
}

void gated_hadamard_backward_cpu(const void* grad, const void* q, const void* k, const void* v, void* grad_q, void* grad_k,
                                 void* grad_v, Shape s, DType dtype, int threads) {
  check_args("gated_hadamard_backward_cpu", s, {grad, q, k, v, grad_q, grad_k, grad_v});
  const int64_t q_size = s.shared_over_channels ? s.batch * s.length : s.batch * s.channels;
  dispatch<Half, BFloat16>(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (s.batch * s.channels * s.length == 0) {  // the gradient of a sum over nothing
      if (q_size) std::fill_n(static_cast<T*>(grad_q), q_size, T{});
      return;
    }
    const T *g = static_cast<const T*>(grad), *qq = static_cast<const T*>(q), *kk = static_cast<const T*>(k),
            *vv = static_cast<const T*>(v);
    T *gq = static_cast<T*>(grad_q), *gk = static_cast<T*>(grad_k), *gv = static_cast<T*>(grad_v);
    for (T* full : {gk, gv}) advise_huge_pages(full, s.batch * s.channels * s.length * int64_t(sizeof(T)));
    if (s.shared_over_channels)
      parallel_for(s.batch, s.channels * s.length, threads,
                   [&](int64_t m0, int64_t m1) { gated_backward_batches(g, qq, kk, vv, gq, gk, gv, m0, m1, s); });
    else
      parallel_for(s.batch * s.channels, s.length, threads,
                   [&](int64_t r0, int64_t r1) { gated_backward_rows(g, qq, kk, vv, gq, gk, gv, r0, r1, s.length); });
  });
}

void softmax_spatial_sum_forward_cpu(const void* logits, const void* p, void* out, Shape s, DType dtype, int threads) {
  check_args("softmax_spatial_sum_forward_cpu", s, {logits, p, out});
  ISG_CHECK(s.length > 0 || s.batch * s.channels == 0, "softmax_spatial_sum_forward_cpu: softmax over an empty spatial axis");
  if (s.batch * s.channels == 0) return;
  dispatch<Half, BFloat16>(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T *l = static_cast<const T*>(logits), *pp = static_cast<const T*>(p);
    T* o = static_cast<T*>(out);
    if (s.shared_over_channels) {
#ifdef ISG_VEC16
      if constexpr (std::is_same_v<T, float>)
        return with_chunks(s.length, [&](auto chunks) {
          parallel_for(s.batch, s.channels * s.length, threads,
                       [&](int64_t m0, int64_t m1) { softmax_forward_batches_vec<decltype(chunks)::value>(l, pp, o, m0, m1, s); });
        });
#endif
      parallel_for(s.batch, s.channels * s.length, threads,
                   [&](int64_t m0, int64_t m1) { softmax_forward_batches(l, pp, o, m0, m1, s); });
    } else {
      parallel_for(s.batch * s.channels, s.length, threads, [&](int64_t r0, int64_t r1) {
        if (s.length <= kShortRow)
          softmax_forward_short_rows(l, pp, o, r0, r1, s.length);
        else
          softmax_forward_rows(l, pp, o, r0, r1, s.length);
      });
    }
  });
}

void softmax_spatial_sum_backward_cpu(const void* grad, const void* logits, const void* p, void* grad_logits, void* grad_p,
                                      Shape s, DType dtype, int threads) {
  check_args("softmax_spatial_sum_backward_cpu", s, {grad, logits, p, grad_logits, grad_p});
  ISG_CHECK(s.length > 0 || s.batch * s.channels == 0, "softmax_spatial_sum_backward_cpu: softmax over an empty spatial axis");
  if (s.batch * s.channels == 0) {
    if (s.shared_over_channels && s.batch * s.length > 0)  // no channel reads the logits: zero gradient
      dispatch<Half, BFloat16>(dtype, [&](auto tag) { std::fill_n(static_cast<decltype(tag)*>(grad_logits), s.batch * s.length, decltype(tag){}); });
    return;
  }
  dispatch<Half, BFloat16>(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T *g = static_cast<const T*>(grad), *l = static_cast<const T*>(logits), *pp = static_cast<const T*>(p);
    T *gl = static_cast<T*>(grad_logits), *gp = static_cast<T*>(grad_p);
    advise_huge_pages(gp, s.batch * s.channels * s.length * int64_t(sizeof(T)));
    if (s.shared_over_channels) {
#ifdef ISG_VEC16
      if constexpr (std::is_same_v<T, float>)
        return with_chunks(s.length, [&](auto chunks) {
          parallel_for(s.batch, s.channels * s.length, threads,
                       [&](int64_t m0, int64_t m1) { softmax_backward_batches_vec<decltype(chunks)::value>(g, l, pp, gl, gp, m0, m1, s); });
        });
#endif
      parallel_for(s.batch, s.channels * s.length, threads,
                   [&](int64_t m0, int64_t m1) { softmax_backward_batches(g, l, pp, gl, gp, m0, m1, s); });
    } else {
      parallel_for(s.batch * s.channels, s.length, threads,
                   [&](int64_t r0, int64_t r1) { softmax_backward_rows(g, l, pp, gl, gp, r0, r1, s.length); });
    }
  });
}

}  // namespace attention
}  // namespace isg
