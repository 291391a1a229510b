// __nv_bfloat16 for emulation builds: the upper half of a float, round-to-nearest-even conversion.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

struct __nv_bfloat16 { uint16_t bits; };

inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t w = uint32_t(b.bits) << 16;
  float f;
  std::memcpy(&f, &w, 4);
  return f;
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t w;
  std::memcpy(&w, &f, 4);
  if (std::isnan(f)) return {uint16_t((w >> 16) | 0x0040u)};
  return {uint16_t((w + 0x7fffu + ((w >> 16) & 1u)) >> 16)};
}
