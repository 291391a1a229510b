// CUDA kernels of the fused Dual Attention ops, both broadcast forms (see attention.h).
//
// * gated_hadamard forward: one thread per element, grid-stride; the index of the broadcast q
//   comes from 32-bit multiply-high divisions (no 64-bit division per element).
// * Everything that reduces over positions or channels works on "units" (a row (m, c) of the
//   plus form, a batch m of the paper form) handled by groups of `width` lanes, width = the next
//   power of two >= L, at most 32: a warp takes 32 / width units at once (2 rows of the model's
//   L = 16 per warp), and reductions over a unit are shuffles inside its group.
//   Paper-form gradients of q / logits sum over channels: each lane owns positions j and loops
//   over c (reads of a fixed c are contiguous across the group's lanes).
// Math per element is shared with the CPU path (attention_math.h); exp is the accurate expf.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <string>

#include "attention/attention.h"
#include "attention/attention_math.h"
#include "common/check.h"

namespace isg {
namespace attention {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / 32;
static_assert(kThreads % 32 == 0 && kThreads <= 1024, "the warp-group kernels need whole warps");
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int64_t kMaxBlocks = 1 << 16;

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

__device__ __forceinline__ float load(const float* p) { return *p; }
__device__ __forceinline__ double load(const double* p) { return *p; }
__device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void store(float* p, float x) { *p = x; }
__device__ __forceinline__ void store(double* p, double x) { *p = x; }
__device__ __forceinline__ void store(__half* p, float x) { *p = __float2half_rn(x); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float x) { *p = __float2bfloat16_rn(x); }

// n / d for n < 2^31 with one multiply-high (Granlund-Montgomery, as PyTorch's IntDivider).
struct Divider {
  uint32_t divisor, magic, shift;
  static Divider make(uint32_t d) {
    uint32_t s = 0;
    while ((uint64_t(1) << s) < d) ++s;
    return {d, uint32_t((uint64_t(1) << 32) * ((uint64_t(1) << s) - d) / d + 1), s};
  }
  __device__ __forceinline__ uint32_t div(uint32_t n) const { return (__umulhi(n, magic) + n) >> shift; }
};

// Sum / max over a group of `width` lanes (aligned, power of two); every lane gets the result.
template <typename acc_t>
__device__ __forceinline__ acc_t group_sum(acc_t x, int width) {
  for (int offset = width >> 1; offset > 0; offset >>= 1) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}

template <typename acc_t>
__device__ __forceinline__ acc_t group_max(acc_t x, int width) {
  for (int offset = width >> 1; offset > 0; offset >>= 1) x = max(x, __shfl_xor_sync(kFullMask, x, offset));
  return x;
}

// Units handled by groups of `width` lanes. All lanes of a warp run the loop the same number of
// times (the shuffles need them); a lane whose unit is past the end has `active` false.
#define ISG_FOR_EACH_GROUP_UNIT(units, width, unit, active, lane)                                   \
  const int lane = int(threadIdx.x & 31) % (width);                                                 \
  const int64_t per_warp = 32 / (width);                                                            \
  const int64_t warp_stride = (int64_t(gridDim.x) * blockDim.x >> 5) * per_warp;                    \
  for (int64_t first = ((blockIdx.x * int64_t(blockDim.x) + threadIdx.x) >> 5) * per_warp; first < (units); \
       first += warp_stride)                                                                        \
    for (int64_t unit = first + int(threadIdx.x & 31) / (width), once = 0; once < 1; ++once)        \
      for (const bool active = unit < (units); !once; once = 1)

// ----------------------------------------------------------------------------- gated_hadamard

// out = sigmoid(q * k) * v over n < 2^31 elements of whole batches; q index: paper m * L + j, plus i / L.
template <bool kPaper, typename T>
__global__ void __launch_bounds__(kThreads) gated_forward_kernel(const T* __restrict__ q, const T* __restrict__ k,
                                                                 const T* __restrict__ v, T* __restrict__ out, uint32_t n,
                                                                 Divider length, Divider batch_size) {
  using acc_t = typename Acc<T>::type;
  for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    const uint32_t row = length.div(i);
    const uint32_t qi = kPaper ? batch_size.div(i) * length.divisor + (i - row * length.divisor) : row;
    store(out + i, gated_forward<acc_t>(load(q + qi), load(k + i), load(v + i)));
  }
}

// Plus form: unit = row; dL/dq[row] = group sum over the row's positions.
// Paper form: unit = batch m; lane owns positions j and sums dL/dq[m, j] over channels.
template <bool kPaper, typename T>
__global__ void __launch_bounds__(kThreads) gated_backward_kernel(const T* __restrict__ grad, const T* __restrict__ q,
                                                                  const T* __restrict__ k, const T* __restrict__ v,
                                                                  T* __restrict__ grad_q, T* __restrict__ grad_k,
                                                                  T* __restrict__ grad_v, Shape s, int width) {
  using acc_t = typename Acc<T>::type;
  const int64_t units = kPaper ? s.batch : s.batch * s.channels, L = s.length;
  ISG_FOR_EACH_GROUP_UNIT(units, width, unit, active, lane) {
    if (kPaper) {
      for (int64_t j = lane; active && j < L; j += width) {
        const acc_t qj = load(q + unit * L + j);
        acc_t dq = 0;
        for (int64_t c = 0; c < s.channels; ++c) {
          const int64_t i = (unit * s.channels + c) * L + j;
          acc_t gk, gv;
          dq += gated_backward<acc_t>(qj, load(k + i), load(v + i), load(grad + i), gk, gv);
          store(grad_k + i, gk);
          store(grad_v + i, gv);
        }
        store(grad_q + unit * L + j, dq);
      }
    } else {
      const acc_t qr = active ? acc_t(load(q + unit)) : acc_t(0);
      acc_t dq = 0;
      for (int64_t j = lane; active && j < L; j += width) {
        const int64_t i = unit * L + j;
        acc_t gk, gv;
        dq += gated_backward<acc_t>(qr, load(k + i), load(v + i), load(grad + i), gk, gv);
        store(grad_k + i, gk);
        store(grad_v + i, gv);
      }
      dq = group_sum(dq, width);
      if (active && lane == 0) store(grad_q + unit, dq);
    }
  }
}

// ----------------------------------------------------------------------------- softmax_spatial_sum

// max_j logits[j] and 1 / sum_j exp(logits[j] - max) of one row, reduced over the group.
template <typename T, typename acc_t>
__device__ __forceinline__ void softmax_stats(const T* logits, int64_t length, int lane, int width, bool active, acc_t& m,
                                              acc_t& inv) {
  m = -INFINITY;
  for (int64_t j = lane; active && j < length; j += width) m = max(m, acc_t(load(logits + j)));
  m = group_max(m, width);
  acc_t sum = 0;
  for (int64_t j = lane; active && j < length; j += width) sum += exp_acc(acc_t(load(logits + j)) - m);
  inv = acc_t(1) / group_sum(sum, width);
}

// Plus form: unit = row. Paper form: unit = batch m, the softmax of logits[m] is computed once
// (held in a register when L <= width) and weights the C channels.
template <bool kPaper, typename T>
__global__ void __launch_bounds__(kThreads) softmax_forward_kernel(const T* __restrict__ logits, const T* __restrict__ p,
                                                                   T* __restrict__ out, Shape s, int width) {
  using acc_t = typename Acc<T>::type;
  const int64_t units = kPaper ? s.batch : s.batch * s.channels, L = s.length;
  const int64_t rows = kPaper ? s.channels : 1;  // rows sharing one softmax
  const bool one_per_lane = L <= width;
  ISG_FOR_EACH_GROUP_UNIT(units, width, unit, active, lane) {
    const T* l = logits + (active ? unit * L : 0);
    acc_t m, inv;
    softmax_stats(l, L, lane, width, active, m, inv);
    const acc_t w0 = active && lane < L ? exp_acc(acc_t(load(l + lane)) - m) * inv : acc_t(0);
    for (int64_t c = 0; c < rows; ++c) {
      const int64_t row = unit * rows + c;
      acc_t acc = 0;
      for (int64_t j = lane; active && j < L; j += width) {
        const acc_t w = one_per_lane ? w0 : exp_acc(acc_t(load(l + j)) - m) * inv;
        acc += w * acc_t(load(p + row * L + j));
      }
      acc = group_sum(acc, width);
      if (active && lane == 0) store(out + row, acc);
    }
  }
}

// Plus form (unit = row): dL/dp_j = g w_j, dL/dlogit_j = g w_j (p_j - out).
// Paper form (unit = batch m): dL/dp[c, j] = g_c w_j, dL/dlogit_j = w_j (dw_j - sum_c g_c out_c) with
// dw_j = sum_c g_c p[c, j]; dw_j stays in a register when L <= width, else p is read twice.
template <bool kPaper, typename T>
__global__ void __launch_bounds__(kThreads) softmax_backward_kernel(const T* __restrict__ grad, const T* __restrict__ logits,
                                                                    const T* __restrict__ p, T* __restrict__ grad_logits,
                                                                    T* __restrict__ grad_p, Shape s, int width) {
  using acc_t = typename Acc<T>::type;
  const int64_t units = kPaper ? s.batch : s.batch * s.channels, L = s.length, C = s.channels;
  ISG_FOR_EACH_GROUP_UNIT(units, width, unit, active, lane) {
    const T* l = logits + (active ? unit * L : 0);
    acc_t m, inv;
    softmax_stats(l, L, lane, width, active, m, inv);
    if (!kPaper) {
      acc_t out = 0;  // recomputed in acc_t, as on the CPU
      for (int64_t j = lane; active && j < L; j += width) out += exp_acc(acc_t(load(l + j)) - m) * acc_t(load(p + unit * L + j));
      out = group_sum(out, width) * inv;
      const acc_t g = active ? acc_t(load(grad + unit)) : acc_t(0);
      for (int64_t j = lane; active && j < L; j += width) {
        acc_t gl, gp;
        softmax_sum_backward<acc_t>(exp_acc(acc_t(load(l + j)) - m) * inv, acc_t(load(p + unit * L + j)), out, g, gl, gp);
        store(grad_logits + unit * L + j, gl);
        store(grad_p + unit * L + j, gp);
      }
    } else if (L <= width) {
      const acc_t w = active && lane < L ? exp_acc(acc_t(load(l + lane)) - m) * inv : acc_t(0);
      acc_t dw = 0;
      for (int64_t c = 0; active && lane < L && c < C; ++c) {
        const acc_t g = load(grad + unit * C + c);
        const int64_t i = (unit * C + c) * L + lane;
        dw += g * acc_t(load(p + i));
        store(grad_p + i, g * w);
      }
      const acc_t mean = group_sum(w * dw, width);
      if (active && lane < L) store(grad_logits + unit * L + lane, w * (dw - mean));
    } else {  // L > 32: dw_j is recomputed in a second pass instead of held
      acc_t mean = 0;  // sum_j w_j dw_j
      for (int64_t j = lane; active && j < L; j += width) {
        const acc_t w = exp_acc(acc_t(load(l + j)) - m) * inv;
        acc_t dw = 0;
        for (int64_t c = 0; c < C; ++c) {
          const acc_t g = load(grad + unit * C + c);
          const int64_t i = (unit * C + c) * L + j;
          dw += g * acc_t(load(p + i));
          store(grad_p + i, g * w);
        }
        mean += w * dw;
      }
      mean = group_sum(mean, width);
      for (int64_t j = lane; active && j < L; j += width) {
        const acc_t w = exp_acc(acc_t(load(l + j)) - m) * inv;
        acc_t dw = 0;
        for (int64_t c = 0; c < C; ++c) dw += acc_t(load(grad + unit * C + c)) * acc_t(load(p + (unit * C + c) * L + j));
        store(grad_logits + unit * L + j, w * (dw - mean));
      }
    }
  }
}

// ----------------------------------------------------------------------------- launchers

// Lanes per unit: the next power of two >= L, at most 32.
int group_width(int64_t length) {
  int width = 1;
  while (width < 32 && width < length) width <<= 1;
  return width;
}

unsigned group_blocks(int64_t units, int width) {
  const int64_t per_block = int64_t(kWarpsPerBlock) * (32 / width);
  return unsigned(std::max<int64_t>(1, std::min<int64_t>((units + per_block - 1) / per_block, kMaxBlocks)));
}

cudaStream_t as_stream(void* stream) { return static_cast<cudaStream_t>(stream); }

}  // namespace

void gated_hadamard_forward_cuda(const void* q, const void* k, const void* v, void* out, Shape s, DType dtype, void* stream) {
  check_args("gated_hadamard_forward_cuda", s, {q, k, v, out});
  const int64_t batch_size = s.channels * s.length;  // elements of one m
  if (s.batch * batch_size == 0) return;
  constexpr int64_t kMaxElements = (int64_t(1) << 31) - 1;
  ISG_CHECK(batch_size <= kMaxElements, "gated_hadamard_forward_cuda: C * L must be < 2^31");
  const int64_t batches_per_launch = kMaxElements / batch_size;  // whole batches, < 2^31 elements per launch
  const int64_t q_per_batch = s.shared_over_channels ? s.length : s.channels;
  const Divider length = Divider::make(uint32_t(s.length)), per_batch = Divider::make(uint32_t(batch_size));
  dispatch<__half, __nv_bfloat16>(dtype, [&](auto tag) {
    using T = decltype(tag);
    for (int64_t m0 = 0; m0 < s.batch; m0 += batches_per_launch) {
      const int64_t n = std::min(batches_per_launch, s.batch - m0) * batch_size;
      const T* qq = static_cast<const T*>(q) + m0 * q_per_batch;
      const T* kk = static_cast<const T*>(k) + m0 * batch_size;
      const T* vv = static_cast<const T*>(v) + m0 * batch_size;
      T* o = static_cast<T*>(out) + m0 * batch_size;
      const unsigned blocks = unsigned(std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks));
      if (s.shared_over_channels)
        gated_forward_kernel<true, T><<<blocks, kThreads, 0, as_stream(stream)>>>(qq, kk, vv, o, uint32_t(n), length, per_batch);
      else
        gated_forward_kernel<false, T><<<blocks, kThreads, 0, as_stream(stream)>>>(qq, kk, vv, o, uint32_t(n), length, per_batch);
      ISG_CUDA_CHECK(cudaGetLastError());
    }
  });
}

void gated_hadamard_backward_cuda(const void* grad, const void* q, const void* k, const void* v, void* grad_q, void* grad_k,
                                  void* grad_v, Shape s, DType dtype, void* stream) {
  check_args("gated_hadamard_backward_cuda", s, {grad, q, k, v, grad_q, grad_k, grad_v});
  const int64_t q_size = s.shared_over_channels ? s.batch * s.length : s.batch * s.channels;
  if (s.batch * s.channels * s.length == 0) {  // the gradient of a sum over nothing
    if (q_size) {
      ISG_CHECK(grad_q != nullptr, "gated_hadamard_backward_cuda: null grad_q");
      dispatch<__half, __nv_bfloat16>(dtype, [&](auto tag) {
        ISG_CUDA_CHECK(cudaMemsetAsync(grad_q, 0, size_t(q_size) * sizeof(decltype(tag)), as_stream(stream)));
      });
    }
    return;
  }
  const int width = group_width(s.length);
  const int64_t units = s.shared_over_channels ? s.batch : s.batch * s.channels;
  dispatch<__half, __nv_bfloat16>(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto args = [&](auto kernel) {
      kernel<<<group_blocks(units, width), kThreads, 0, as_stream(stream)>>>(
          static_cast<const T*>(grad), static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v),
          static_cast<T*>(grad_q), static_cast<T*>(grad_k), static_cast<T*>(grad_v), s, width);
    };
    if (s.shared_over_channels)
      args(gated_backward_kernel<true, T>);
    else
      args(gated_backward_kernel<false, T>);
  });
  ISG_CUDA_CHECK(cudaGetLastError());
}

void softmax_spatial_sum_forward_cuda(const void* logits, const void* p, void* out, Shape s, DType dtype, void* stream) {
  check_args("softmax_spatial_sum_forward_cuda", s, {logits, p, out});
  ISG_CHECK(s.length > 0 || s.batch * s.channels == 0, "softmax_spatial_sum_forward_cuda: softmax over an empty spatial axis");
  if (s.batch * s.channels == 0) return;
  const int width = group_width(s.length);
  const int64_t units = s.shared_over_channels ? s.batch : s.batch * s.channels;
  dispatch<__half, __nv_bfloat16>(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto launch = [&](auto kernel) {
      kernel<<<group_blocks(units, width), kThreads, 0, as_stream(stream)>>>(static_cast<const T*>(logits), static_cast<const T*>(p),
                                                                             static_cast<T*>(out), s, width);
    };
    if (s.shared_over_channels)
      launch(softmax_forward_kernel<true, T>);
    else
      launch(softmax_forward_kernel<false, T>);
  });
  ISG_CUDA_CHECK(cudaGetLastError());
}

void softmax_spatial_sum_backward_cuda(const void* grad, const void* logits, const void* p, void* grad_logits, void* grad_p,
                                       Shape s, DType dtype, void* stream) {
  check_args("softmax_spatial_sum_backward_cuda", s, {grad, logits, p, grad_logits, grad_p});
  ISG_CHECK(s.length > 0 || s.batch * s.channels == 0, "softmax_spatial_sum_backward_cuda: softmax over an empty spatial axis");
  if (s.batch * s.channels == 0) {
    if (s.shared_over_channels && s.batch * s.length > 0) {  // no channel reads the logits: zero gradient
      ISG_CHECK(grad_logits != nullptr, "softmax_spatial_sum_backward_cuda: null grad_logits");
      dispatch<__half, __nv_bfloat16>(dtype, [&](auto tag) {
        ISG_CUDA_CHECK(cudaMemsetAsync(grad_logits, 0, size_t(s.batch * s.length) * sizeof(decltype(tag)), as_stream(stream)));
      });
    }
    return;
  }
  const int width = group_width(s.length);
  const int64_t units = s.shared_over_channels ? s.batch : s.batch * s.channels;
  dispatch<__half, __nv_bfloat16>(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto launch = [&](auto kernel) {
      kernel<<<group_blocks(units, width), kThreads, 0, as_stream(stream)>>>(
          static_cast<const T*>(grad), static_cast<const T*>(logits), static_cast<const T*>(p), static_cast<T*>(grad_logits),
          static_cast<T*>(grad_p), s, width);
    };
    if (s.shared_over_channels)
      launch(softmax_backward_kernel<true, T>);
    else
      launch(softmax_backward_kernel<false, T>);
  });
  ISG_CUDA_CHECK(cudaGetLastError());
}

}  // namespace attention
}  // namespace isg
