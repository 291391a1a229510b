#pragma once
// Two-part code length of one residual histogram (256 bins), computed on the host for
// histograms from any device (so identical histograms give identical bits). The
// definition is documented in isg/ops/shannon.py:
//   bits = sum_{s: n_s > 0} n_s log2(N / n_s) + 8 + log2 C(256, K) + log2 C(N - 1, K - 1)
#include <math.h>
#include <stdint.h>

namespace isg {
namespace shannon {

// log2 C(n, k) = sum_{i=1..k} log2((n - k + i) / i), with k -> min(k, n - k).
inline double log2_binomial(int64_t n, int64_t k) {
  if (k > n - k) k = n - k;
  double total = 0.0;
  for (int64_t i = 1; i <= k; ++i) total += log2(double(n - k + i) / double(i));
  return total;
}

// Bits of one channel's residual histogram hist[256].
inline double histogram_bits(const int64_t* hist) {
  int64_t total = 0, used = 0;
  for (int s = 0; s < 256; ++s) {
    total += hist[s];
    used += hist[s] > 0;
  }
  if (total == 0) return 0.0;
  double data = 0.0;
  for (int s = 0; s < 256; ++s)
    if (hist[s] > 0) data += double(hist[s]) * log2(double(total) / double(hist[s]));
  return data + 8.0 + log2_binomial(256, used) + log2_binomial(total - 1, used - 1);
}

// Bits of one tile: the sum over its channels' histograms hist[channels][256].
inline double tile_bits(const int64_t* hist, int64_t channels) {
  double bits = 0.0;
  for (int64_t c = 0; c < channels; ++c) bits += histogram_bits(hist + c * 256);
  return bits;
}

}  // namespace shannon
}  // namespace isg
