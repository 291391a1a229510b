// CUDA kernels of the fused Dual Attention ops. Element-wise forward of
// gated_hadamard: one thread per element; reductions over the spatial axis
// (dL/dq, softmax max / sum, weighted sum): one warp per row with shuffles.
// The per-element math is shared with the CPU path (attention_math.h).
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

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_max(acc_t x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x = max(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

template <typename T>
__global__ void gated_forward_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ out,
                                     int64_t rows, int64_t length) {
  using acc_t = typename Acc<T>::type;
  const int64_t n = rows * length;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    store(out + i, gated_forward<acc_t>(load(q + i / length), load(k + i), load(v + i)));
}

// Warps stride over rows; every lane of a warp works on the same row, so the
// shuffles below always see a full warp.
#define ISG_FOR_EACH_WARP_ROW(row)                                                          \
  const int lane = threadIdx.x & 31;                                                        \
  const int64_t first_row = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) >> 5;          \
  const int64_t warp_stride = (int64_t(gridDim.x) * blockDim.x) >> 5;                       \
  for (int64_t row = first_row; row < rows; row += warp_stride)

template <typename T>
__global__ void gated_backward_kernel(const T* __restrict__ grad, const T* __restrict__ q, const T* __restrict__ k,
                                      const T* __restrict__ v, T* __restrict__ grad_q, T* __restrict__ grad_k,
                                      T* __restrict__ grad_v, int64_t rows, int64_t length) {
  using acc_t = typename Acc<T>::type;
  ISG_FOR_EACH_WARP_ROW(row) {
    const acc_t qr = load(q + row);
    const int64_t base = row * length;
    acc_t dq = 0;
    for (int64_t j = lane; j < length; j += 32) {
      acc_t gk, gv;
      dq += gated_backward<acc_t>(qr, load(k + base + j), load(v + base + j), load(grad + base + j), gk, gv);
      store(grad_k + base + j, gk);
      store(grad_v + base + j, gv);
    }
    dq = warp_sum(dq);
    if (lane == 0) store(grad_q + row, dq);
  }
}

// max_j logits[j] and sum_j exp(logits[j] - max), reduced over the warp.
template <typename T, typename acc_t>
__device__ __forceinline__ void row_softmax_stats(const T* logits, int64_t length, int lane, acc_t& m, acc_t& sum) {
  m = -INFINITY;
  for (int64_t j = lane; j < length; j += 32) m = max(m, acc_t(load(logits + j)));
  m = warp_max(m);
  sum = 0;
  for (int64_t j = lane; j < length; j += 32) sum += exp_acc(acc_t(load(logits + j)) - m);
  sum = warp_sum(sum);
}

template <typename T>
__global__ void softmax_forward_kernel(const T* __restrict__ logits, const T* __restrict__ p, T* __restrict__ out, int64_t rows,
                                       int64_t length) {
  using acc_t = typename Acc<T>::type;
  ISG_FOR_EACH_WARP_ROW(row) {
    const int64_t base = row * length;
    acc_t m, sum;
    row_softmax_stats(logits + base, length, lane, m, sum);
    acc_t acc = 0;
    for (int64_t j = lane; j < length; j += 32) acc += exp_acc(acc_t(load(logits + base + j)) - m) * acc_t(load(p + base + j));
    acc = warp_sum(acc);
    if (lane == 0) store(out + row, acc / sum);
  }
}

template <typename T>
__global__ void softmax_backward_kernel(const T* __restrict__ grad, const T* __restrict__ logits, const T* __restrict__ p,
                                        T* __restrict__ grad_logits, T* __restrict__ grad_p, int64_t rows, int64_t length) {
  using acc_t = typename Acc<T>::type;
  ISG_FOR_EACH_WARP_ROW(row) {
    const int64_t base = row * length;
    acc_t m, sum;
    row_softmax_stats(logits + base, length, lane, m, sum);
    const acc_t inv = acc_t(1) / sum;
    acc_t out = 0;  // recomputed in acc_t, as on the CPU
    for (int64_t j = lane; j < length; j += 32) out += exp_acc(acc_t(load(logits + base + j)) - m) * acc_t(load(p + base + j));
    out = warp_sum(out) * inv;
    const acc_t g = load(grad + row);
    for (int64_t j = lane; j < length; j += 32) {
      acc_t gl, gp;
      const acc_t w = exp_acc(acc_t(load(logits + base + j)) - m) * inv;
      softmax_sum_backward<acc_t>(w, acc_t(load(p + base + j)), out, g, gl, gp);
      store(grad_logits + base + j, gl);
      store(grad_p + base + j, gp);
    }
  }
}

template <typename F>
void dispatch(DType dtype, F&& fn) {
  switch (dtype) {
    case DType::Float32: return fn(float{});
    case DType::Float64: return fn(double{});
    case DType::Float16: return fn(__half{});
    case DType::BFloat16: return fn(__nv_bfloat16{});
  }
  ISG_CHECK(false, "attention (CUDA): unsupported dtype code " + std::to_string(int(dtype)));
}

unsigned elementwise_blocks(int64_t n) { return unsigned(std::min<int64_t>((n + kThreads - 1) / kThreads, 1 << 16)); }
unsigned warp_row_blocks(int64_t rows) { return unsigned(std::min<int64_t>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock, 1 << 16)); }

void check_sizes(const char* op, int64_t rows, int64_t length) {
  ISG_CHECK(rows >= 0 && length >= 0, std::string(op) + ": negative size");
}

}  // namespace

void gated_hadamard_forward_cuda(const void* q, const void* k, const void* v, void* out, int64_t rows, int64_t length, DType dtype,
                                 void* stream) {
  check_sizes("gated_hadamard_forward_cuda", rows, length);
  if (rows * length == 0) return;
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    gated_forward_kernel<T><<<elementwise_blocks(rows * length), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), static_cast<T*>(out), rows, length);
  });
  ISG_CUDA_CHECK(cudaGetLastError());
}

void gated_hadamard_backward_cuda(const void* grad, const void* q, const void* k, const void* v, void* grad_q, void* grad_k,
                                  void* grad_v, int64_t rows, int64_t length, DType dtype, void* stream) {
  check_sizes("gated_hadamard_backward_cuda", rows, length);
  if (rows == 0) return;
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    gated_backward_kernel<T><<<warp_row_blocks(rows), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(grad), static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v),
        static_cast<T*>(grad_q), static_cast<T*>(grad_k), static_cast<T*>(grad_v), rows, length);
  });
  ISG_CUDA_CHECK(cudaGetLastError());
}

void softmax_spatial_sum_forward_cuda(const void* logits, const void* p, void* out, int64_t rows, int64_t length, DType dtype,
                                      void* stream) {
  check_sizes("softmax_spatial_sum_forward_cuda", rows, length);
  ISG_CHECK(length > 0 || rows == 0, "softmax_spatial_sum_forward_cuda: softmax over an empty spatial axis");
  if (rows == 0) return;
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    softmax_forward_kernel<T><<<warp_row_blocks(rows), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(logits), static_cast<const T*>(p), static_cast<T*>(out), rows, length);
  });
  ISG_CUDA_CHECK(cudaGetLastError());
}

void softmax_spatial_sum_backward_cuda(const void* grad, const void* logits, const void* p, void* grad_logits, void* grad_p,
                                       int64_t rows, int64_t length, DType dtype, void* stream) {
  check_sizes("softmax_spatial_sum_backward_cuda", rows, length);
  if (rows * length == 0) return;
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    softmax_backward_kernel<T><<<warp_row_blocks(rows), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(grad), static_cast<const T*>(logits), static_cast<const T*>(p), static_cast<T*>(grad_logits),
        static_cast<T*>(grad_p), rows, length);
  });
  ISG_CUDA_CHECK(cudaGetLastError());
}

}  // namespace attention
}  // namespace isg
