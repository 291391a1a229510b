#pragma once
// Shannon scorer kernels (see isg/ops/shannon.py for the definition).
//
// A batch of `tiles` uint8 tiles of `height` x `width` x `channels` is given
// without copies as a base pointer, one element offset per tile and the
// element strides inside a tile (row, column, channel): a [B, H, W, C] tensor
// (offsets b * stride_b) and a tile grid over a decoded region [H, W, C]
// (offsets y * row_stride + x * col_stride) are the same call.
// Outputs: int32 residual histograms [tiles, channels, 256] (counts <= H * W < 2^31) and, from
// int64 histograms, float64 bits [tiles]. Bits are computed on the host only, for tiles scored on
// any device, so identical histograms give identical bits.
#include <cstdint>

namespace isg {
namespace shannon {

struct TileBatch {
  const uint8_t* base;
  const int64_t* offsets;  // [tiles], elements from base (host or device memory, as the function needs)
  int64_t tiles, height, width, channels;
  int64_t stride_h, stride_w, stride_c;
};

// Throws std::invalid_argument (Python ValueError) for sizes or pointers no kernel may read.
void check_batch(const TileBatch& batch, const int32_t* hist);

// Host pointers; OpenMP over tiles (`num_threads` <= 0: OpenMP's default).
void histogram_cpu(TileBatch batch, int32_t* hist, int num_threads);
void bits_cpu(const int64_t* hist, int64_t tiles, int64_t channels, double* bits, int num_threads);

#ifdef ISG_WITH_CUDA
constexpr int kMaxCudaChannels = 4;
// Device pointers (base, offsets, hist); asynchronous on `stream` (a cudaStream_t).
void histogram_cuda(TileBatch batch, int32_t* hist, void* stream);
#endif

}  // namespace shannon
}  // namespace isg
