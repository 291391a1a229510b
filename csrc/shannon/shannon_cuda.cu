// Shannon scorer, CUDA: MED residual histograms, one block per tile (bits are computed from the
// histograms on the host, by the same code as the CPU path: a ranking never depends on the device).
//
// The rows of a tile are split into bands, one per warp; a warp walks its band down, one strip of
// columns at a time, carrying the upper neighbours in registers from the row above.
//
// Word path (pixels packed: stride_c == 1, pitch P = stride_w of 1..4 bytes, channels <= P; rows of
// whole words, 4-byte aligned; RGB, RGBA with alpha dropped as a view, grey): a row is n = width * P
// bytes, read as 32-bit words, one word per lane (a strip is 32 words, all counted; lane 0 also loads
// the word to their left). Byte b of a row belongs to channel b % P; its left neighbour is byte b - P, taken
// from the lane's own word and the lower lane's (one __shfl_up_sync and one funnel shift per word). MED
// in SIMD form: cur - median(a, b, a + b - c) = cur + c - max(a, b, c) - min(a, b, c) (mod 256), in
// 16-bit lanes (even bytes, odd bytes in place) with Hopper's 3-way min/max (__vimax3_u16x2, one
// instruction on sm_90). Edges come from the neighbours given: on the first row b = c = a (pred = a),
// in the first column a = c (pred = b), and pixel (0, 0) sees a = b = c = 0 (pred = 0).
//
// Generic path (any other strides): one pixel per lane, one byte load per channel (the earlier
// kernel). Both count into one shared int32 histogram per block with atomicAdd(+1), which ptxas
// turns into ATOMS.POPC.INC (by its name: a warp's lanes with the same bin combined into one update).
#include <cuda_runtime.h>

#include "common/check.h"
#include "shannon/shannon.h"

namespace isg {
namespace shannon {
namespace {

constexpr int kThreads = 128;                  // 4 bands per tile: 64 rows each at 256 px (setup per strip and band)
constexpr int kRows = 8;                       // word path: rows loaded ahead per lane (loads in flight)
constexpr int kTrash = kMaxCudaChannels;       // histogram slot of bytes that are no pixel of the tile
constexpr int kSlots = kMaxCudaChannels + 1;
constexpr int kSlotStride = 256 + 11;          // channels 11 banks apart: small residuals of different channels in other banks
constexpr unsigned kFullMask = 0xffffffffu;
static_assert(kThreads % 32 == 0 && kThreads >= 32 && kThreads <= 1024, "whole warps: the band loops need full-warp shuffles");

__device__ __forceinline__ int med_predict(int a, int b, int c) {
  const int lo = min(a, b), hi = max(a, b);
  return min(max(a + b - c, lo), hi);  // median(a, b, a + b - c)
}

// ------------------------------------------------------------------------------------------- word path

__device__ __forceinline__ void increment(unsigned shared_address) {
  atomicAdd(static_cast<unsigned*>(__cvta_shared_to_generic(shared_address)), 1u);
}

struct Split {        // a word's bytes 0, 2 (even) and 1, 3 (odd, in place), each in its own 16-bit lane
  unsigned even, odd;
};

__device__ __forceinline__ Split split(unsigned word) { return {word & 0x00ff00ffu, word & 0xff00ff00u}; }

// Counts the residuals of the 4 bytes of `cur` given its left (a), upper (b) and upper-left (c)
// bytes: cur + c - max3 - min3 per byte. A byte's sum lies in [-255, 510] (c >= min3, cur - max3 >= -255);
// the bias 256 keeps the low 16-bit lane's sum in [1, 766] (even; times 256 for odd bytes), so it never
// borrows from the high lane, whose sum only has to be right mod 256.
// The 4 increments: increment j counts byte order[j] of the word (order[3] = 3) into the histogram slot at
// shared-space address slot[j] (32-bit: one LEA per increment; from a generic pointer ptxas would add the
// shared window's base to every address). For RGB (pitch 3) the order makes increments 0..2 count channel
// 0..2 on every lane: their lanes' bins lie in one channel's 256 bins, i.e. in distinct banks unless equal
// (then combined), which roughly halves the shared-memory wavefronts on tissue (bench/bench_shannon.py model).
struct Increments {
  unsigned slot[4];
  unsigned order[3];   // __byte_perm selectors: byte order[j] & 3 of the residual word, zero-extended
};

__device__ __forceinline__ void count_word(Split cur, Split a, Split b, Split c, const Increments& inc) {
  const unsigned even = cur.even + c.even - __vimax3_u16x2(a.even, b.even, c.even) -
                        __vimin3_u16x2(a.even, b.even, c.even) + 0x100u;
  const unsigned odd = cur.odd + c.odd - __vimax3_u16x2(a.odd, b.odd, c.odd) -
                       __vimin3_u16x2(a.odd, b.odd, c.odd) + 0x10000u;
  const unsigned residuals = __byte_perm(even, odd, 0x7250);   // the word's residual bytes: even 0, odd 1, even 2, odd 3
#pragma unroll
  for (int j = 0; j < 3; ++j) increment(inc.slot[j] + 4 * __byte_perm(residuals, 0, inc.order[j]));
  increment(inc.slot[3] + 4 * __byte_perm(residuals, 0, 0x4443));
}

// Word-path geometry, computed on the host once per launch (32-bit: a row has < 2^31 words).
struct Words {
  int words;      // words per tile row (width * pitch / 4)
  int row_words;  // row stride in words
};

// The histogram slots and byte order of one lane's word w (see Increments): for pitch 3, increments 0..2
// count channels 0..2 (byte (j - w) mod 3 of the word) and increment 3 counts byte 3, channel w mod 3
// (`phase`); for pitch 1, 2, 4 increment j counts byte j, channel j mod pitch. Words past the row's end
// and bytes of channels not scored (alpha of an RGBA view) count into the trash slot.
template <int P>
__device__ __forceinline__ Increments strip_increments(bool counted, int phase, int channels, unsigned shared_sub) {
  Increments inc;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    int byte = j, channel = j % P;
    if (P == 3) {
      byte = j - phase < 0 ? j - phase + 3 : j - phase;
      channel = j < 3 ? j : phase;
      if (j == 3) byte = 3;
    }
    inc.slot[j] = unsigned(counted && channel < channels ? channel : kTrash) * (kSlotStride * 4u) + shared_sub;
    if (j < 3) inc.order[j] = 0x4440u | unsigned(byte);
  }
  return inc;
}

// Rows [i0, i1) of a tile with `P` bytes per pixel whose rows are whole, aligned words. A strip is 32
// words, one per lane, all counted; lane 0's left word (the word before the strip, none in the first
// strip) is its own extra load, the other lanes' come from the lower lane. Setup in 32-bit arithmetic,
// once per band; per strip a few compares and moves.
template <int P>
__device__ void band_words(const TileBatch& t, Words g, const uint8_t* origin, unsigned* sub, int i0, int i1, int lane) {
  constexpr int kShift = 8 * P;                                // funnel shift: the left pixel's bytes
  const unsigned shared_sub = unsigned(__cvta_generic_to_shared(sub));
  const unsigned* first_row = reinterpret_cast<const unsigned*>(origin) + int64_t(i0 > 0 ? i0 - 1 : 0) * g.row_words;
  int phase = lane % 3;                                        // pitch 3: (w0 + lane) mod 3, w0 = 0
  for (int w0 = 0; w0 < g.words; w0 += 32) {                   // warp-uniform loops: every lane reaches the shuffles
    const int w = w0 + lane;
    const Increments inc = strip_increments<P>(w < g.words, phase, int(t.channels), shared_sub);
    phase = phase + 2 >= 3 ? phase - 1 : phase + 2;            // the next strip starts 32 = 2 (mod 3) words later
    const bool has_left = lane == 0 && w0 > 0;                 // lane 0 loads its left word (zero in the first strip)
    const unsigned* p = first_row + min(w, g.words - 1);       // lanes past the row's end re-read its last word (trash)
    const int step = g.row_words;
    // One row of the strip: lane 0's left word (loaded) or the lower lane's word, then the residuals; the
    // row becomes the upper neighbour (b) and its left word the upper-left one (c) of the next row.
    auto left_of = [&](unsigned cur, unsigned left0) {
      const unsigned lower = __shfl_up_sync(kFullMask, cur, 1);
      return __funnelshift_lc(lane == 0 ? left0 : lower, cur, kShift);
    };
    Split b, c;
    int i = i0;
    {
      const unsigned up = __ldg(p), up_left = has_left ? __ldg(p - 1) : 0u;
      p += step;
      const unsigned a = left_of(up, up_left);
      if (i0 == 0) {                                           // first row: b = c = a, i.e. pred = a
        count_word(split(up), split(a), split(a), split(a), inc);
        i = 1;
      }                                                        // else: the row above the band, context only
      b = split(up);
      c = split(a);
    }
    for (; i + kRows <= i1; i += kRows) {
      unsigned cur[kRows], left[kRows];
#pragma unroll
      for (int r = 0; r < kRows; ++r) {                        // loads first: kRows words in flight per lane
        cur[r] = __ldg(p);
        left[r] = has_left ? __ldg(p - 1) : 0u;
        p += step;
      }
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const Split cs = split(cur[r]), as = split(left_of(cur[r], left[r]));
        count_word(cs, as, b, c, inc);
        b = cs;
        c = as;
      }
    }
#pragma unroll 1
    for (; i < i1; ++i) {                                      // the band's last rows % kRows, one at a time (small code)
      const unsigned cur = __ldg(p), left = has_left ? __ldg(p - 1) : 0u;
      p += step;
      const Split cs = split(cur), as = split(left_of(cur, left));
      count_word(cs, as, b, c, inc);
      b = cs;
      c = as;
    }
  }
}

// ------------------------------------------------------------------------------------------- generic path

// Rows [i0, i1), 32 columns at a time: lane l holds pixel (i, x0 + l) of every channel, its upper
// neighbours in registers, the left ones from the lower lane (lane 0 reads its two).
__device__ void band_pixels(const TileBatch& t, const uint8_t* origin, unsigned* sub, int64_t i0, int64_t i1, int lane) {
  for (int64_t x0 = 0; x0 < t.width; x0 += 32) {
    const int64_t j = x0 + lane;
    const bool inside = j < t.width;
    const uint8_t* column = origin + j * t.stride_w;
    int up[kMaxCudaChannels] = {0, 0, 0, 0};                   // pixel (i - 1, j)
#pragma unroll
    for (int c = 0; c < kMaxCudaChannels; ++c)                 // (unrolled: up[] stays in registers)
      if (c < t.channels && i0 > 0 && inside) up[c] = __ldg(column + (i0 - 1) * t.stride_h + c * t.stride_c);
    for (int64_t i = i0; i < i1; ++i) {
      const uint8_t* p = column + i * t.stride_h;
#pragma unroll
      for (int c = 0; c < kMaxCudaChannels; ++c) {
        if (c >= t.channels) break;                            // uniform over the warp
        const int cur = inside ? __ldg(p + c * t.stride_c) : 0;
        int left = __shfl_up_sync(kFullMask, cur, 1), up_left = __shfl_up_sync(kFullMask, up[c], 1);
        if (lane == 0 && j > 0) {                              // the chunk's first column: neighbours from memory
          left = __ldg(p - t.stride_w + c * t.stride_c);
          up_left = i > 0 ? __ldg(p - t.stride_h - t.stride_w + c * t.stride_c) : 0;
        }
        const int pred = i == 0 ? (j == 0 ? 0 : left) : (j == 0 ? up[c] : med_predict(left, up[c], up_left));
        atomicAdd(sub + (inside ? c : kTrash) * kSlotStride + (unsigned(cur - pred) & 255u), 1u);
        up[c] = cur;
      }
    }
  }
}

// ------------------------------------------------------------------------------------------- kernel

// P = 1..4: packed pixels of P bytes, rows of whole words (the word path for tiles whose origin is 4-byte
// aligned, the generic one for the others, decided per block); P = 0: the generic path only.
template <int P>
__global__ void __launch_bounds__(kThreads) histogram_kernel(TileBatch t, Words g, int32_t* __restrict__ hist) {
  __shared__ unsigned sub[kSlots * kSlotStride];
  for (int k = threadIdx.x; k < kSlots * kSlotStride; k += blockDim.x) sub[k] = 0u;
  __syncthreads();

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  const uint8_t* origin = t.base + t.offsets[blockIdx.x];
  const int height = int(t.height), band = (height + warps - 1) / warps;
  const int i0 = warp * band, i1 = min(height, i0 + band);
  if (i0 < i1) {                                               // uniform over the warp
    bool words = false;
    if constexpr (P > 0) words = reinterpret_cast<uintptr_t>(origin) % 4 == 0;  // uniform over the block
    if constexpr (P > 0) {
      if (words) band_words<P>(t, g, origin, sub, i0, i1, lane);
    }
    if (!words) band_pixels(t, origin, sub, i0, i1, lane);
  }
  __syncthreads();

  int32_t* out = hist + int64_t(blockIdx.x) * t.channels * 256;
  for (int k = threadIdx.x; k < t.channels * 256; k += blockDim.x) out[k] = int32_t(sub[(k >> 8) * kSlotStride + (k & 255)]);
}

}  // namespace

void histogram_cuda(TileBatch batch, int32_t* hist, void* stream) {
  check_batch(batch, hist);
  if (batch.tiles == 0) return;
  ISG_CHECK(batch.channels <= kMaxCudaChannels, "shannon (CUDA): at most 4 channels per tile");
  ISG_CHECK(batch.tiles < (int64_t(1) << 31), "shannon (CUDA): too many tiles for one launch");
  // Word path: packed pixels of 1..4 bytes, whole aligned words per row (tiles whose origin is not
  // 4-byte aligned take the generic path, decided per block).
  const int64_t pitch = batch.stride_w;
  const bool words = (batch.stride_c == 1 || batch.channels == 1) && pitch >= 1 && pitch <= 4 && batch.channels <= pitch &&
                     (batch.width * pitch) % 4 == 0 && batch.width * pitch / 4 < (int64_t(1) << 30) && batch.stride_h % 4 == 0 &&
                     batch.stride_h / 4 < (int64_t(1) << 31) && batch.stride_h / 4 > -(int64_t(1) << 31);
  const Words g{words ? int(batch.width * pitch / 4) : 0, words ? int(batch.stride_h / 4) : 0};
  auto launch = [&](auto kernel) {
    kernel<<<unsigned(batch.tiles), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(batch, g, hist);
  };
  switch (words ? pitch : 0) {
    case 1: launch(histogram_kernel<1>); break;
    case 2: launch(histogram_kernel<2>); break;
    case 3: launch(histogram_kernel<3>); break;
    case 4: launch(histogram_kernel<4>); break;
    default: launch(histogram_kernel<0>);
  }
  ISG_CUDA_CHECK(cudaGetLastError());
}

}  // namespace shannon
}  // namespace isg
