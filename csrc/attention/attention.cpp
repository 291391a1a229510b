// CPU kernels of the fused Dual Attention ops (OpenMP over rows) and their pybind11 bindings.
// No FP-trap semantics in this file: lets GCC if-convert (and so vectorise) the
// clamps of exp_acc; results are unchanged (IEEE rounding is kept).
#pragma GCC optimize("no-trapping-math")
#include "attention/attention.h"

#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "attention/attention_math.h"
#include "common/check.h"

namespace py = pybind11;

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

template <typename F>
void dispatch(DType dtype, F&& fn) {
  switch (dtype) {
    case DType::Float32: return fn(float{});
    case DType::Float64: return fn(double{});
    case DType::Float16: return fn(Half{});
    case DType::BFloat16: return fn(BFloat16{});
  }
  ISG_CHECK(false, "attention: unsupported dtype code " + std::to_string(int(dtype)));
}

// ----------------------------------------------------------------------------- kernels (one row = one (m, c))
// Each kernel handles rows [r0, r1); `parallel_rows` spreads blocks of rows over
// OpenMP threads. On x86-64 the kernels are cloned for AVX-512 and AVX2 and the
// best clone is picked at load time (the default build targets SSE2 only).

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ISG_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ISG_CLONES
#endif

template <typename F>
void parallel_rows(int64_t rows, int64_t length, F&& kernel) {
  const int64_t block = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, length));  // ~16k elements per task
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t r0 = 0; r0 < rows; r0 += block) kernel(r0, std::min(rows, r0 + block));
}

template <typename T>
ISG_CLONES void gated_forward_rows(const T* q, const T* k, const T* v, T* out, int64_t r0, int64_t r1, int64_t length) {
  using acc_t = typename Acc<T>::type;
  for (int64_t r = r0; r < r1; ++r) {
    const acc_t qr = load(q + r);
    const int64_t base = r * length;
#pragma omp simd
    for (int64_t j = 0; j < length; ++j) {
      const acc_t value = gated_forward<acc_t>(qr, load(k + base + j), load(v + base + j));
      store(out + base + j, value);
    }
  }
}

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

// Forward of softmax_spatial_sum on short rows (L <= kShortRow): one row per
// vector lane instead of one row per loop. A group of kGroup rows is
// transposed into [L][kGroup] buffers, so the max, exp and the sums run across
// rows with no horizontal reductions (these dominate when a row is a single
// vector: 2.5x faster at L = 16). The backward keeps one row per loop: its
// transposed write-back of two gradients costs more than it saves.
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

void check_sizes(const char* op, int64_t rows, int64_t length) {
  ISG_CHECK(rows >= 0 && length >= 0, std::string(op) + ": negative size (rows=" + std::to_string(rows) +
                                           ", length=" + std::to_string(length) + ")");
}

}  // namespace

// ----------------------------------------------------------------------------- public CPU entry points

void gated_hadamard_forward_cpu(const void* q, const void* k, const void* v, void* out, int64_t rows, int64_t length, DType dtype) {
  check_sizes("gated_hadamard_forward", rows, length);
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    parallel_rows(rows, length, [&](int64_t r0, int64_t r1) {
      gated_forward_rows(static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), static_cast<T*>(out), r0, r1,
                         length);
    });
  });
}

void gated_hadamard_backward_cpu(const void* grad, const void* q, const void* k, const void* v, void* grad_q, void* grad_k,
                                 void* grad_v, int64_t rows, int64_t length, DType dtype) {
  check_sizes("gated_hadamard_backward", rows, length);
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    parallel_rows(rows, length, [&](int64_t r0, int64_t r1) {
      gated_backward_rows(static_cast<const T*>(grad), static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v),
                          static_cast<T*>(grad_q), static_cast<T*>(grad_k), static_cast<T*>(grad_v), r0, r1, length);
    });
  });
}

void softmax_spatial_sum_forward_cpu(const void* logits, const void* p, void* out, int64_t rows, int64_t length, DType dtype) {
  check_sizes("softmax_spatial_sum_forward", rows, length);
  ISG_CHECK(length > 0 || rows == 0, "softmax_spatial_sum_forward: softmax over an empty spatial axis");
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    parallel_rows(rows, length, [&](int64_t r0, int64_t r1) {
      if (length <= kShortRow)
        softmax_forward_short_rows(static_cast<const T*>(logits), static_cast<const T*>(p), static_cast<T*>(out), r0, r1, length);
      else
        softmax_forward_rows(static_cast<const T*>(logits), static_cast<const T*>(p), static_cast<T*>(out), r0, r1, length);
    });
  });
}

void softmax_spatial_sum_backward_cpu(const void* grad, const void* logits, const void* p, void* grad_logits, void* grad_p,
                                      int64_t rows, int64_t length, DType dtype) {
  check_sizes("softmax_spatial_sum_backward", rows, length);
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    parallel_rows(rows, length, [&](int64_t r0, int64_t r1) {
      softmax_backward_rows(static_cast<const T*>(grad), static_cast<const T*>(logits), static_cast<const T*>(p),
                            static_cast<T*>(grad_logits), static_cast<T*>(grad_p), r0, r1, length);
    });
  });
}

}  // namespace attention

// ----------------------------------------------------------------------------- bindings

namespace {
template <typename T = void>
T* ptr(uintptr_t address) { return reinterpret_cast<T*>(address); }
attention::DType to_dtype(int code) {
  ISG_CHECK(code >= 0 && code <= 3, "attention: dtype code must be 0 (float32), 1 (float64), 2 (float16) or 3 (bfloat16), got " +
                                        std::to_string(code));
  return static_cast<attention::DType>(code);
}
}  // namespace

void register_attention(py::module_& m) {
  using namespace attention;
  m.def("gated_hadamard_forward",
        [](uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, int64_t rows, int64_t length, int dtype) {
          const DType dt = to_dtype(dtype);
          py::gil_scoped_release release;
          gated_hadamard_forward_cpu(ptr(q), ptr(k), ptr(v), ptr(out), rows, length, dt);
        },
        "out[r, j] = sigmoid(q[r] * k[r, j]) * v[r, j] on CPU (raw pointers; rows = M * C, length = L)");
  m.def("gated_hadamard_backward",
        [](uintptr_t grad, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t grad_q, uintptr_t grad_k, uintptr_t grad_v, int64_t rows,
           int64_t length, int dtype) {
          const DType dt = to_dtype(dtype);
          py::gil_scoped_release release;
          gated_hadamard_backward_cpu(ptr(grad), ptr(q), ptr(k), ptr(v), ptr(grad_q), ptr(grad_k), ptr(grad_v), rows, length, dt);
        },
        "gradients of gated_hadamard on CPU");
  m.def("softmax_spatial_sum_forward",
        [](uintptr_t logits, uintptr_t p, uintptr_t out, int64_t rows, int64_t length, int dtype) {
          const DType dt = to_dtype(dtype);
          py::gil_scoped_release release;
          softmax_spatial_sum_forward_cpu(ptr(logits), ptr(p), ptr(out), rows, length, dt);
        },
        "out[r] = sum_j softmax_j(logits[r, :]) * p[r, j] on CPU");
  m.def("softmax_spatial_sum_backward",
        [](uintptr_t grad, uintptr_t logits, uintptr_t p, uintptr_t grad_logits, uintptr_t grad_p, int64_t rows, int64_t length,
           int dtype) {
          const DType dt = to_dtype(dtype);
          py::gil_scoped_release release;
          softmax_spatial_sum_backward_cpu(ptr(grad), ptr(logits), ptr(p), ptr(grad_logits), ptr(grad_p), rows, length, dt);
        },
        "gradients of softmax_spatial_sum on CPU (the forward output is recomputed in float)");
#ifdef ISG_WITH_CUDA
  m.def("gated_hadamard_forward_cuda",
        [](uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, int64_t rows, int64_t length, int dtype, uintptr_t stream) {
          const DType dt = to_dtype(dtype);
          py::gil_scoped_release release;
          gated_hadamard_forward_cuda(ptr(q), ptr(k), ptr(v), ptr(out), rows, length, dt, ptr(stream));
        });
  m.def("gated_hadamard_backward_cuda",
        [](uintptr_t grad, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t grad_q, uintptr_t grad_k, uintptr_t grad_v, int64_t rows,
           int64_t length, int dtype, uintptr_t stream) {
          const DType dt = to_dtype(dtype);
          py::gil_scoped_release release;
          gated_hadamard_backward_cuda(ptr(grad), ptr(q), ptr(k), ptr(v), ptr(grad_q), ptr(grad_k), ptr(grad_v), rows, length, dt,
                                       ptr(stream));
        });
  m.def("softmax_spatial_sum_forward_cuda",
        [](uintptr_t logits, uintptr_t p, uintptr_t out, int64_t rows, int64_t length, int dtype, uintptr_t stream) {
          const DType dt = to_dtype(dtype);
          py::gil_scoped_release release;
          softmax_spatial_sum_forward_cuda(ptr(logits), ptr(p), ptr(out), rows, length, dt, ptr(stream));
        });
  m.def("softmax_spatial_sum_backward_cuda",
        [](uintptr_t grad, uintptr_t logits, uintptr_t p, uintptr_t grad_logits, uintptr_t grad_p, int64_t rows, int64_t length,
           int dtype, uintptr_t stream) {
          const DType dt = to_dtype(dtype);
          py::gil_scoped_release release;
          softmax_spatial_sum_backward_cuda(ptr(grad), ptr(logits), ptr(p), ptr(grad_logits), ptr(grad_p), rows, length, dt,
                                            ptr(stream));
        });
#endif
}

}  // namespace isg
