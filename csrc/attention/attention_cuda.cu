// CUDA kernels of the fused Dual Attention ops, both broadcast forms (see attention.h).
//
// * gated_hadamard forward: one thread per element, grid-stride; the index of the broadcast q
//   comes from 32-bit multiply-high divisions (no 64-bit division per element).
// * Reductions over positions work on groups of W lanes (W = the next power of two >= L, 4..32, a
//   template parameter: the shuffle trees are unrolled); a position j is lane j % W of its group.
// * Plus form (q [M, C, 1], logits [M, C, L]): a group per row (m, c), 256 / W rows per block.
// * Paper form (q, logits [M, 1, L], shared by the C rows of a patch m): a block per patch m
//   (grid-stride), its 256 / W groups split the C channels (group g: channels g, g + G, ...), each
//   loads several rows before using them (8 to 12 loads in flight per lane); sums over channels
//   (dL/dq, dw = sum_c g_c p[c, :]) are reduced across groups in shared memory. At M = 4096,
//   C = 128, L = 16 that is 4096 blocks of 16 groups, 8 channels each (the earlier kernel: 256 blocks,
//   every lane looping over all 128 channels with one load in flight).
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
static_assert(kThreads % 32 == 0 && kThreads <= 1024, "the group kernels need whole warps");
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int64_t kMaxBlocks = 1 << 16;
constexpr int kUnroll = 4;     // paper form, gated backward: channel rows loaded per group before use (12 loads per lane)
constexpr int kRowsAhead = 8;  // paper form, softmax: rows of p loaded per group before use (8 loads per lane)
constexpr int kMinBlocks = 4;  // resident blocks per SM the group kernels are compiled for (<= 64 registers)

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

// Sum / max over an aligned group of W lanes; every lane gets the result.
template <int W, typename acc_t>
__device__ __forceinline__ acc_t group_sum(acc_t x) {
#pragma unroll
  for (int offset = W >> 1; offset > 0; offset >>= 1) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}

template <int W, typename acc_t>
__device__ __forceinline__ acc_t group_max(acc_t x) {
#pragma unroll
  for (int offset = W >> 1; offset > 0; offset >>= 1) x = max(x, __shfl_xor_sync(kFullMask, x, offset));
  return x;
}

// The thread's group and lane: kThreads / W groups per block.
template <int W>
struct Group {
  static constexpr int kPerBlock = kThreads / W;
  int index = int(threadIdx.x) / W, lane = int(threadIdx.x) % W;
};

// Plus form: rows (m, c) by groups, grid-stride. Every lane of a warp runs the loop the same number of
// times (the shuffles need them); a lane whose row is past the end has `active` false.
template <int W, typename F>
__device__ __forceinline__ void for_each_row(int64_t rows, F&& body) {
  const Group<W> group;
  const int64_t stride = int64_t(gridDim.x) * Group<W>::kPerBlock;
  const int64_t warp_first = int64_t(blockIdx.x) * Group<W>::kPerBlock + (group.index & ~(32 / W - 1));
  for (int64_t first = warp_first; first < rows; first += stride) {
    const int64_t row = first + (group.index & (32 / W - 1));
    body(row, row < rows, group.lane);
  }
}

// Paper form: shared-memory sum over the block's groups of one value per lane (lane j of every group holds a
// partial sum for position j); lanes of group 0 get the totals. Ends with a barrier (the buffer is reused).
template <int W, typename acc_t>
__device__ __forceinline__ acc_t sum_over_groups(acc_t* buffer, acc_t x, const Group<W>& group) {
  buffer[threadIdx.x] = x;
  __syncthreads();
  acc_t total = 0;
  if (group.index == 0)
    for (int g = 0; g < Group<W>::kPerBlock; ++g) total += buffer[g * W + group.lane];
  __syncthreads();
  return total;
}

// max_j logits[j] and 1 / sum_j exp(logits[j] - max) of one row of `length`, reduced over the group.
template <int W, typename T, typename acc_t>
__device__ __forceinline__ void softmax_stats(const T* logits, int64_t length, int lane, bool active, acc_t& m, acc_t& inv) {
  m = -INFINITY;
  for (int64_t j = lane; active && j < length; j += W) m = max(m, acc_t(load(logits + j)));
  m = group_max<W>(m);
  acc_t sum = 0;
  for (int64_t j = lane; active && j < length; j += W) sum += exp_acc(acc_t(load(logits + j)) - m);
  inv = acc_t(1) / group_sum<W>(sum);
}

// Plus form: sum_j softmax_j(logits) p_j of one row, reduced over the group, with the row's max and 1 / sum.
template <int W, typename T, typename acc_t>
__device__ __forceinline__ acc_t softmax_row_sum(const T* logits, const T* p, int64_t length, int lane, bool active, acc_t& m,
                                                 acc_t& inv) {
  softmax_stats<W>(logits, length, lane, active, m, inv);
  acc_t acc = 0;
  for (int64_t j = lane; active && j < length; j += W) acc += exp_acc(acc_t(load(logits + j)) - m) * acc_t(load(p + j));
  return group_sum<W>(acc) * inv;
}

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

// Plus form: a group per row; dL/dq[row] = group sum over the row's positions.
// Paper form: a block per patch m, groups over channels; per chunk of W positions each lane sums its
// position's dL/dq over its group's channels, then over the groups.
template <int W, bool kPaper, typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    gated_backward_kernel(const T* __restrict__ grad, const T* __restrict__ q, const T* __restrict__ k,
                          const T* __restrict__ v, T* __restrict__ grad_q, T* __restrict__ grad_k,
                          T* __restrict__ grad_v, Shape s) {
  using acc_t = typename Acc<T>::type;
  if constexpr (!kPaper) {
    const int64_t L = s.length;
    for_each_row<W>(s.batch * s.channels, [&](int64_t row, bool active, int lane) {
      const acc_t qr = active ? acc_t(load(q + row)) : acc_t(0);
      acc_t dq = 0;
      for (int64_t j = lane; active && j < L; j += W) {
        const int64_t i = row * L + j;
        acc_t gk, gv;
        dq += gated_backward<acc_t>(qr, load(k + i), load(v + i), load(grad + i), gk, gv);
        store(grad_k + i, gk);
        store(grad_v + i, gv);
      }
      dq = group_sum<W>(dq);
      if (active && lane == 0) store(grad_q + row, dq);
    });
  } else {
    __shared__ acc_t partial[kThreads];
    const Group<W> group;
    const int64_t L = s.length, C = s.channels;
    constexpr int64_t kStep = int64_t(kUnroll) * Group<W>::kPerBlock;
    for (int64_t m = blockIdx.x; m < s.batch; m += gridDim.x) {          // uniform over the block: barriers inside
      for (int64_t j0 = 0; j0 < L; j0 += W) {
        const int64_t j = j0 + group.lane;
        const bool inside = j < L;
        const acc_t qj = inside ? acc_t(load(q + m * L + j)) : acc_t(0);
        acc_t dq = 0;
        for (int64_t c0 = group.index; c0 < C; c0 += kStep) {   // no shuffles inside: groups may differ
          acc_t kk[kUnroll], vv[kUnroll], gg[kUnroll];
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) {                            // loads first
            const int64_t c = c0 + int64_t(u) * Group<W>::kPerBlock, i = (m * C + c) * L + j;
            const bool load_it = inside && c < C;
            kk[u] = load_it ? acc_t(load(k + i)) : acc_t(0);
            vv[u] = load_it ? acc_t(load(v + i)) : acc_t(0);
            gg[u] = load_it ? acc_t(load(grad + i)) : acc_t(0);
          }
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) {
            const int64_t c = c0 + int64_t(u) * Group<W>::kPerBlock, i = (m * C + c) * L + j;
            if (!inside || c >= C) continue;
            acc_t gk, gv;
            dq += gated_backward<acc_t>(qj, kk[u], vv[u], gg[u], gk, gv);
            store(grad_k + i, gk);
            store(grad_v + i, gv);
          }
        }
        dq = sum_over_groups<W>(partial, dq, group);
        if (group.index == 0 && inside) store(grad_q + m * L + j, dq);
      }
    }
  }
}

// ----------------------------------------------------------------------------- softmax_spatial_sum

// Plus form: a group per row: out[row] = sum_j softmax_j(logits[row]) p[row, j].
// Paper form: a block per patch m; every group computes the softmax of logits[m] (L reads from cache) and
// the weighted sums of its channel rows, kAhead rows per step. With L <= W a lane holds its weight.
template <int W, bool kPaper, typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    softmax_forward_kernel(const T* __restrict__ logits, const T* __restrict__ p, T* __restrict__ out, Shape s) {
  using acc_t = typename Acc<T>::type;
  if constexpr (!kPaper) {
    const int64_t L = s.length;
    for_each_row<W>(s.batch * s.channels, [&](int64_t row, bool active, int lane) {
      acc_t m, inv;
      const acc_t acc = softmax_row_sum<W>(logits + (active ? row * L : 0), p + row * L, L, lane, active, m, inv);
      if (active && lane == 0) store(out + row, acc);
    });
  } else {
    constexpr int kAhead = sizeof(acc_t) == 8 ? kRowsAhead / 2 : kRowsAhead;  // double: half as many (no spills)
    const Group<W> group;
    const int64_t L = s.length, C = s.channels;
    constexpr int64_t kStep = int64_t(kAhead) * Group<W>::kPerBlock;
    for (int64_t m = blockIdx.x; m < s.batch; m += gridDim.x) {
      const T* l = logits + m * L;
      acc_t mx, inv;
      softmax_stats<W>(l, L, group.lane, true, mx, inv);
      const acc_t w0 = group.lane < L ? exp_acc(acc_t(load(l + group.lane)) - mx) * inv : acc_t(0);
      for (int64_t c0 = 0; c0 < C; c0 += kStep) {                       // the same iterations for every group (shuffles)
        const int64_t first = c0 + group.index;                          // this group's first channel of the step
        acc_t acc[kAhead];
#pragma unroll
        for (int u = 0; u < kAhead; ++u) acc[u] = 0;
        for (int64_t j = group.lane; j < L; j += W) {
          const acc_t w = L <= W ? w0 : exp_acc(acc_t(load(l + j)) - mx) * inv;
          acc_t pv[kAhead];
#pragma unroll
          for (int u = 0; u < kAhead; ++u) {                            // loads first
            const int64_t c = first + int64_t(u) * Group<W>::kPerBlock;
            pv[u] = c < C ? acc_t(load(p + (m * C + c) * L + j)) : acc_t(0);
          }
#pragma unroll
          for (int u = 0; u < kAhead; ++u) acc[u] += w * pv[u];
        }
#pragma unroll
        for (int u = 0; u < kAhead; ++u) {
          const int64_t c = first + int64_t(u) * Group<W>::kPerBlock;
          const acc_t total = group_sum<W>(acc[u]);
          if (group.lane == 0 && c < C) store(out + m * C + c, total);
        }
      }
    }
  }
}

// Plus form (a group per row): dL/dp_j = g w_j, dL/dlogit_j = g w_j (p_j - out).
// Paper form (a block per patch m, groups over channels): dL/dp[c, j] = g_c w_j and
// dL/dlogit_j = w_j (dw_j - mean) with dw_j = sum_c g_c p[c, j] (partial per group, summed over the groups)
// and mean = sum_j w_j dw_j. With L <= W one pass over p; with L > W the mean is taken first as
// sum_c g_c out_c (out_c = sum_j w_j p[c, j], the forward output), a second pass over p.
template <int W, bool kPaper, typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    softmax_backward_kernel(const T* __restrict__ grad, const T* __restrict__ logits, const T* __restrict__ p,
                            T* __restrict__ grad_logits, T* __restrict__ grad_p, Shape s) {
  using acc_t = typename Acc<T>::type;
  if constexpr (!kPaper) {
    const int64_t L = s.length;
    for_each_row<W>(s.batch * s.channels, [&](int64_t row, bool active, int lane) {
      const T* l = logits + (active ? row * L : 0);
      acc_t m, inv;
      const acc_t out = softmax_row_sum<W>(l, p + row * L, L, lane, active, m, inv);  // recomputed in acc_t, as on the CPU
      const acc_t g = active ? acc_t(load(grad + row)) : acc_t(0);
      for (int64_t j = lane; active && j < L; j += W) {
        acc_t gl, gp;
        softmax_sum_backward<acc_t>(exp_acc(acc_t(load(l + j)) - m) * inv, acc_t(load(p + row * L + j)), out, g, gl, gp);
        store(grad_logits + row * L + j, gl);
        store(grad_p + row * L + j, gp);
      }
    });
  } else {
    constexpr int kAhead = sizeof(acc_t) == 8 ? kRowsAhead / 2 : kRowsAhead;  // double: half as many (no spills)
    __shared__ acc_t partial[kThreads];
    const Group<W> group;
    const int64_t L = s.length, C = s.channels;
    constexpr int64_t kStep = int64_t(kAhead) * Group<W>::kPerBlock;
    for (int64_t m = blockIdx.x; m < s.batch; m += gridDim.x) {          // uniform over the block: barriers inside
      const T* l = logits + m * L;
      acc_t mx, inv;
      softmax_stats<W>(l, L, group.lane, true, mx, inv);
      acc_t mean = 0;
      if (L > W) {                                                       // mean = sum_c g_c out_c, out_c over all chunks
        acc_t mine = 0;
        for (int64_t c0 = 0; c0 < C; c0 += Group<W>::kPerBlock) {        // the same iterations for every group (shuffles)
          const int64_t c = c0 + group.index;
          acc_t out = 0;
          for (int64_t j = group.lane; c < C && j < L; j += W)
            out += exp_acc(acc_t(load(l + j)) - mx) * inv * acc_t(load(p + (m * C + c) * L + j));
          out = group_sum<W>(out);
          if (c < C) mine += acc_t(load(grad + m * C + c)) * out;
        }
        partial[threadIdx.x] = group.lane == 0 ? mine : acc_t(0);
        __syncthreads();
        for (int g = 0; g < Group<W>::kPerBlock; ++g) mean += partial[g * W];
        __syncthreads();
      }
      for (int64_t j0 = 0; j0 < L; j0 += W) {
        const int64_t j = j0 + group.lane;
        const bool inside = j < L;
        const acc_t w = inside ? exp_acc(acc_t(load(l + j)) - mx) * inv : acc_t(0);
        acc_t dw = 0;
        for (int64_t c0 = group.index; c0 < C; c0 += kStep) {
          acc_t pv[kAhead], gv[kAhead];
#pragma unroll
          for (int u = 0; u < kAhead; ++u) {                            // loads first
            const int64_t c = c0 + int64_t(u) * Group<W>::kPerBlock;
            const bool load_it = inside && c < C;
            gv[u] = c < C ? acc_t(load(grad + m * C + c)) : acc_t(0);
            pv[u] = load_it ? acc_t(load(p + (m * C + c) * L + j)) : acc_t(0);
          }
#pragma unroll
          for (int u = 0; u < kAhead; ++u) {
            const int64_t c = c0 + int64_t(u) * Group<W>::kPerBlock;
            dw += gv[u] * pv[u];
            if (inside && c < C) store(grad_p + (m * C + c) * L + j, gv[u] * w);
          }
        }
        dw = sum_over_groups<W>(partial, dw, group);                     // totals in group 0, zero elsewhere
        if (threadIdx.x < 32) {                                          // warp 0, whole: the shuffles of group_sum
          if (L <= W) mean = group_sum<W>(w * dw);
          if (group.index == 0 && inside) store(grad_logits + m * L + j, w * (dw - mean));
        }
      }
    }
  }
}

// ----------------------------------------------------------------------------- launchers

// Runs launch(kernel-width tag) with W = the next power of two >= L, at least 4, at most 32.
template <typename F>
void with_width(int64_t length, F&& launch) {
  if (length <= 4) return launch(std::integral_constant<int, 4>{});
  if (length <= 8) return launch(std::integral_constant<int, 8>{});
  if (length <= 16) return launch(std::integral_constant<int, 16>{});
  return launch(std::integral_constant<int, 32>{});
}

// Plus form: blocks of 256 / W rows; paper form: a block per patch (grid-stride beyond kMaxBlocks).
unsigned blocks_for(const Shape& s, int width) {
  const int64_t units = s.shared_over_channels ? s.batch : (s.batch * s.channels + kThreads / width - 1) / (kThreads / width);
  return unsigned(std::max<int64_t>(1, std::min<int64_t>(units, kMaxBlocks)));
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
  dispatch<__half, __nv_bfloat16>(dtype, [&](auto tag) {
    using T = decltype(tag);
    with_width(s.length, [&](auto width) {
      constexpr int W = decltype(width)::value;
      auto kernel = s.shared_over_channels ? gated_backward_kernel<W, true, T> : gated_backward_kernel<W, false, T>;
      kernel<<<blocks_for(s, W), kThreads, 0, as_stream(stream)>>>(
          static_cast<const T*>(grad), static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v),
          static_cast<T*>(grad_q), static_cast<T*>(grad_k), static_cast<T*>(grad_v), s);
    });
  });
  ISG_CUDA_CHECK(cudaGetLastError());
}

void softmax_spatial_sum_forward_cuda(const void* logits, const void* p, void* out, Shape s, DType dtype, void* stream) {
  check_args("softmax_spatial_sum_forward_cuda", s, {logits, p, out});
  ISG_CHECK(s.length > 0 || s.batch * s.channels == 0, "softmax_spatial_sum_forward_cuda: softmax over an empty spatial axis");
  if (s.batch * s.channels == 0) return;
  dispatch<__half, __nv_bfloat16>(dtype, [&](auto tag) {
    using T = decltype(tag);
    with_width(s.length, [&](auto width) {
      constexpr int W = decltype(width)::value;
      auto kernel = s.shared_over_channels ? softmax_forward_kernel<W, true, T> : softmax_forward_kernel<W, false, T>;
      kernel<<<blocks_for(s, W), kThreads, 0, as_stream(stream)>>>(static_cast<const T*>(logits), static_cast<const T*>(p),
                                                                  static_cast<T*>(out), s);
    });
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
  dispatch<__half, __nv_bfloat16>(dtype, [&](auto tag) {
    using T = decltype(tag);
    with_width(s.length, [&](auto width) {
      constexpr int W = decltype(width)::value;
      auto kernel = s.shared_over_channels ? softmax_backward_kernel<W, true, T> : softmax_backward_kernel<W, false, T>;
      kernel<<<blocks_for(s, W), kThreads, 0, as_stream(stream)>>>(static_cast<const T*>(grad), static_cast<const T*>(logits),
                                                                  static_cast<const T*>(p), static_cast<T*>(grad_logits),
                                                                  static_cast<T*>(grad_p), s);
    });
  });
  ISG_CUDA_CHECK(cudaGetLastError());
}

}  // namespace attention
}  // namespace isg
