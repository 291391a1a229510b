// Shannon scorer, CUDA: one block per (tile, channel) builds the MED residual
// histogram in shared memory (one copy per warp; warp-aggregated atomics on flat
// areas), then one thread per tile turns histograms into bits with the same double
// formula as the CPU (shannon_bits.h), so identical histograms give identical bits.
#include <cuda_runtime.h>

#include "common/check.h"
#include "shannon/shannon.h"
#include "shannon/shannon_bits.h"

namespace isg {
namespace shannon {
namespace {

constexpr int kThreads = 256;
constexpr int kCopies = 8;  // shared sub-histograms (warp w -> copy w % kCopies)

__device__ __forceinline__ int med_predict(const uint8_t* p, int64_t i, int64_t j, int64_t sh, int64_t sw) {
  if (i == 0) return j == 0 ? 0 : __ldg(p - sw);             // first row: left; (0, 0): 0
  const int b = __ldg(p - sh);
  if (j == 0) return b;                                      // first column: up
  const int a = __ldg(p - sw), c = __ldg(p - sh - sw);
  const int lo = min(a, b), hi = max(a, b);
  return min(max(a + b - c, lo), hi);                        // median(a, b, a + b - c)
}

// Each warp takes rows i = warp, warp + warps, ...; its lanes walk the columns. When all lanes hold the
// same residual (flat background) they add it with one shared atomic, so flat areas do not serialize.
__global__ void histogram_kernel(TileBatch t, int64_t* __restrict__ hist) {
  __shared__ unsigned int sub[kCopies][256];
  for (int k = threadIdx.x; k < kCopies * 256; k += blockDim.x) (&sub[0][0])[k] = 0u;
  __syncthreads();

  const int64_t tile = blockIdx.x / t.channels, channel = blockIdx.x % t.channels;
  const uint8_t* origin = t.base + t.offsets[tile] + channel * t.stride_c;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  unsigned int* mine = sub[warp % kCopies];
  for (int64_t i = warp; i < t.height; i += warps) {
    const uint8_t* row = origin + i * t.stride_h;
    for (int64_t j = lane; j < t.width; j += 32) {
      const uint8_t* p = row + j * t.stride_w;
      const unsigned residual = uint8_t(__ldg(p) - med_predict(p, i, j, t.stride_h, t.stride_w));
      // flat areas: the whole warp holds one residual -> one atomic; else one atomic per lane
      const unsigned active = __activemask();
      const int leader = __ffs(active) - 1;
      const unsigned first = __shfl_sync(active, residual, leader);
      if (__all_sync(active, residual == first)) {
        if (lane == leader) atomicAdd(&mine[residual], unsigned(__popc(active)));
      } else {
        atomicAdd(&mine[residual], 1u);
      }
    }
  }
  __syncthreads();

  int64_t* out = hist + int64_t(blockIdx.x) * 256;
  for (int s = threadIdx.x; s < 256; s += blockDim.x) {
    int64_t total = 0;
    for (int c = 0; c < kCopies; ++c) total += sub[c][s];
    out[s] = total;
  }
}

__global__ void bits_kernel(const int64_t* __restrict__ hist, int64_t tiles, int64_t channels, double* __restrict__ bits) {
  const int64_t tile = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (tile < tiles) bits[tile] = tile_bits(hist + tile * channels * 256, channels);
}

}  // namespace

void histograms_cuda(const TileBatch& batch, int64_t* hist, uintptr_t stream) {
  if (batch.tiles == 0) return;
  const int64_t blocks = batch.tiles * batch.channels;
  ISG_CHECK(blocks < (int64_t(1) << 31), "shannon: too many tiles x channels for one launch");
  histogram_kernel<<<unsigned(blocks), kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(batch, hist);
  ISG_CUDA_CHECK(cudaGetLastError());
}

void bits_cuda(const int64_t* hist, int64_t tiles, int64_t channels, double* bits, uintptr_t stream) {
  if (tiles == 0) return;
  const int threads = 128;
  const int64_t blocks = (tiles + threads - 1) / threads;
  bits_kernel<<<unsigned(blocks), threads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(hist, tiles, channels, bits);
  ISG_CUDA_CHECK(cudaGetLastError());
}

}  // namespace shannon
}  // namespace isg
