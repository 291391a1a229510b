// Shannon scorer, CUDA: MED residual histograms, one block per tile (bits are computed from the
// histograms on the host, by the same code as the CPU path: a ranking never depends on the device).
//
// Warp w of the block walks a band of rows [i0, i1) down, 32 columns at a time: lane l holds
// pixel (i, x0 + l) of every channel. Each pixel is read once from memory (the warp's loads of a
// row are one contiguous span for packed RGB), its upper neighbours stay in registers from the
// previous row, the left ones come from the next lower lane by __shfl_up_sync (lane 0 reads its
// two). Residuals are counted in shared int32 histograms (one copy per warp parity) with
// warp-aggregated atomics: __match_any_sync groups lanes holding the same residual and one lane
// adds the group's size, so flat background costs one atomic per warp instead of 32.
#include <cuda_runtime.h>

#include "common/check.h"
#include "shannon/shannon.h"

namespace isg {
namespace shannon {
namespace {

constexpr int kThreads = 256;
constexpr int kCopies = 2;  // shared sub-histograms (warp w -> copy w % kCopies)
static_assert(kThreads % 32 == 0 && kThreads >= 32 && kThreads <= 1024, "whole warps: the band loop needs full-warp shuffles");
static_assert((kThreads / 32) % kCopies == 0, "every histogram copy serves the same number of warps");
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ int med_predict(int a, int b, int c) {
  const int lo = min(a, b), hi = max(a, b);
  return min(max(a + b - c, lo), hi);  // median(a, b, a + b - c)
}

__global__ void __launch_bounds__(kThreads) histogram_kernel(TileBatch t, int32_t* __restrict__ hist) {
  __shared__ unsigned sub[kCopies][kMaxCudaChannels][256];
  for (int k = threadIdx.x; k < kCopies * kMaxCudaChannels * 256; k += blockDim.x) (&sub[0][0][0])[k] = 0u;
  __syncthreads();

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  const uint8_t* origin = t.base + t.offsets[blockIdx.x];
  const int64_t band = (t.height + warps - 1) / warps;
  const int64_t i0 = warp * band, i1 = min(t.height, i0 + band);
  unsigned (*mine)[256] = sub[warp % kCopies];
  for (int64_t x0 = 0; x0 < t.width; x0 += 32) {   // warp-uniform loops: every lane reaches the collectives
    const int64_t j = x0 + lane;
    const bool inside = j < t.width;
    const uint8_t* column = origin + j * t.stride_w;
    int up[kMaxCudaChannels] = {0, 0, 0, 0};          // pixel (i - 1, j)
    if (i0 > 0 && inside)
      for (int c = 0; c < t.channels; ++c) up[c] = __ldg(column + (i0 - 1) * t.stride_h + c * t.stride_c);
    for (int64_t i = i0; i < i1; ++i) {
      const uint8_t* p = column + i * t.stride_h;
#pragma unroll
      for (int c = 0; c < kMaxCudaChannels; ++c) {
        if (c >= t.channels) break;                    // uniform over the warp
        const int cur = inside ? __ldg(p + c * t.stride_c) : 0;
        int left = __shfl_up_sync(kFullMask, cur, 1), up_left = __shfl_up_sync(kFullMask, up[c], 1);
        if (lane == 0 && j > 0) {                      // the chunk's first column: neighbours from memory
          left = __ldg(p - t.stride_w + c * t.stride_c);
          up_left = i > 0 ? __ldg(p - t.stride_h - t.stride_w + c * t.stride_c) : 0;
        }
        const int pred = i == 0 ? (j == 0 ? 0 : left) : (j == 0 ? up[c] : med_predict(left, up[c], up_left));
        const unsigned residual = unsigned(cur - pred) & 255u;
        const unsigned key = inside ? residual : 256u;   // lanes past the edge form their own group
        const unsigned peers = __match_any_sync(kFullMask, key);
        if (inside && lane == __ffs(int(peers)) - 1) atomicAdd(&mine[c][residual], unsigned(__popc(peers)));
        up[c] = cur;
      }
    }
  }
  __syncthreads();

  int32_t* out = hist + int64_t(blockIdx.x) * t.channels * 256;
  for (int k = threadIdx.x; k < t.channels * 256; k += blockDim.x) {
    unsigned total = 0;
    for (int copy = 0; copy < kCopies; ++copy) total += sub[copy][k >> 8][k & 255];
    out[k] = int32_t(total);
  }
}

}  // namespace

void histograms_cuda(const TileBatch& batch, int32_t* hist, uintptr_t stream) {
  if (batch.tiles == 0) return;
  ISG_CHECK(batch.channels <= kMaxCudaChannels, "shannon (CUDA): at most 4 channels per tile");
  ISG_CHECK(batch.tiles < (int64_t(1) << 31), "shannon (CUDA): too many tiles for one launch");
  histogram_kernel<<<unsigned(batch.tiles), kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(batch, hist);
  ISG_CUDA_CHECK(cudaGetLastError());
}

}  // namespace shannon
}  // namespace isg
