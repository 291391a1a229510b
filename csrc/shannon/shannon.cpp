// Shannon scorer, CPU: MED residual histograms per tile (OpenMP over tiles) and their two-part
// code length; the argument checks of both devices. Bound in csrc/module.cpp.
#include "shannon/shannon.h"

#include <algorithm>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "common/check.h"
#include "shannon/shannon_bits.h"

namespace isg {
namespace shannon {
namespace {

// Residuals of one interleaved row (n = width * channels bytes): the left
// neighbour of byte j is byte j - channels. `prev` is null on the first row.
// Written as plain loops over bytes so the compiler vectorizes them.
void row_residuals(const uint8_t* __restrict cur, const uint8_t* __restrict prev, int64_t n, int64_t channels,
                   uint8_t* __restrict res) {
  const int64_t head = std::min(n, channels);
  if (prev == nullptr) {
    if (n > 0) res[0] = cur[0];                          // pixel (0, 0): pred = 0
    for (int64_t j = 1; j < head; ++j) res[j] = cur[j];  // other channels of pixel (0, 0)
    for (int64_t j = head; j < n; ++j) res[j] = uint8_t(cur[j] - cur[j - channels]);  // first row: left
    return;
  }
  for (int64_t j = 0; j < head; ++j) res[j] = uint8_t(cur[j] - prev[j]);  // first column: up
  for (int64_t j = head; j < n; ++j) {
    // median(a, b, a + b - c) in the LOCO-I form, all in uint8 lanes (a + b - c is only taken when it lies
    // strictly between min(a, b) and max(a, b), so its mod-256 value is exact): 16 pixels per SSE2 op
    const uint8_t a = cur[j - channels], b = prev[j], c = prev[j - channels];
    const uint8_t lo = a < b ? a : b, hi = a < b ? b : a;
    const uint8_t gradient = uint8_t(a + b - c);
    const uint8_t pred = c >= hi ? lo : (c <= lo ? hi : gradient);
    res[j] = uint8_t(cur[j] - pred);
  }
}

// Adds residual bytes to LANES sub-histograms (lane = j % LANES, LANES % channels == 0),
// which breaks the store-to-load dependency of repeated symbols.
template <int LANES>
void accumulate(const uint8_t* __restrict res, int64_t n, uint32_t* __restrict sub) {
  int64_t j = 0;
  for (; j + LANES <= n; j += LANES)
    for (int l = 0; l < LANES; ++l) ++sub[l * 256 + res[j + l]];
  for (int l = 0; j < n; ++j, ++l) ++sub[l * 256 + res[j]];
}

int lanes_for(int64_t channels) {
  if (channels == 1) return 4;
  if (channels == 2) return 4;
  if (channels == 3) return 6;
  return int(channels);
}

void tile_histogram(const TileBatch& t, int64_t tile, int32_t* hist, std::vector<uint8_t>& rows,
                    std::vector<uint32_t>& sub) {
  const int64_t n = t.width * t.channels;
  const bool packed = t.stride_w == t.channels && t.stride_c == 1;  // rows are contiguous bytes
  const int lanes = lanes_for(t.channels);
  rows.resize(size_t(3 * n));
  sub.assign(size_t(lanes) * 256, 0u);
  uint8_t* res = rows.data();
  uint8_t* gathered[2] = {rows.data() + n, rows.data() + 2 * n};
  const uint8_t* origin = t.base + t.offsets[tile];
  const uint8_t* prev = nullptr;
  for (int64_t i = 0; i < t.height; ++i) {
    const uint8_t* src = origin + i * t.stride_h;
    const uint8_t* cur = src;
    if (!packed) {  // gather a strided row into a packed buffer
      uint8_t* dst = gathered[i & 1];
      for (int64_t x = 0; x < t.width; ++x)
        for (int64_t c = 0; c < t.channels; ++c) dst[x * t.channels + c] = src[x * t.stride_w + c * t.stride_c];
      cur = dst;
    }
    row_residuals(cur, prev, n, t.channels, res);
    switch (lanes) {
      case 4: accumulate<4>(res, n, sub.data()); break;
      case 6: accumulate<6>(res, n, sub.data()); break;
      default:
        for (int64_t j = 0; j < n; ++j) ++sub[(j % lanes) * 256 + res[j]];
    }
    prev = cur;
  }
  int32_t* out = hist + tile * t.channels * 256;
  std::memset(out, 0, sizeof(int32_t) * size_t(t.channels) * 256);
  for (int l = 0; l < lanes; ++l)
    for (int s = 0; s < 256; ++s) out[(l % t.channels) * 256 + s] += int32_t(sub[l * 256 + s]);
}

}  // namespace

void check_batch(const TileBatch& t, const int32_t* hist) {
  ISG_CHECK(t.tiles >= 0, "shannon: tiles must be >= 0");
  ISG_CHECK(t.height >= 1 && t.width >= 1, "shannon: tile height and width must be >= 1");
  ISG_CHECK(t.channels >= 1 && t.channels <= 64, "shannon: channels must be in 1..64");
  ISG_CHECK(t.height * t.width < (int64_t(1) << 31), "shannon: tiles of 2^31 pixels or more overflow int32 counts");
  ISG_CHECK(t.tiles == 0 || (t.base != nullptr && t.offsets != nullptr), "shannon: null data or offsets pointer");
  ISG_CHECK(t.tiles == 0 || hist != nullptr, "shannon: null histogram pointer");
}

void histogram_cpu(TileBatch batch, int32_t* hist, int num_threads) {
  check_batch(batch, hist);
#ifdef _OPENMP
  if (num_threads <= 0) num_threads = omp_get_max_threads();
#pragma omp parallel num_threads(num_threads)
#endif
  {
    std::vector<uint8_t> rows;
    std::vector<uint32_t> sub;
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t tile = 0; tile < batch.tiles; ++tile) tile_histogram(batch, tile, hist, rows, sub);
  }
}

void bits_cpu(const int64_t* hist, int64_t tiles, int64_t channels, double* bits, int num_threads) {
  ISG_CHECK(tiles >= 0 && channels >= 1, "shannon: bad histogram shape");
  ISG_CHECK(tiles == 0 || (hist != nullptr && bits != nullptr), "shannon: null pointer");
#ifdef _OPENMP
  if (num_threads <= 0) num_threads = omp_get_max_threads();
#pragma omp parallel for schedule(static) num_threads(num_threads)
#endif
  for (int64_t tile = 0; tile < tiles; ++tile) bits[tile] = tile_bits(hist + tile * channels * 256, channels);
}

}  // namespace shannon
}  // namespace isg
