// __half for emulation builds: IEEE binary16 storage, float math, round-to-nearest-even conversion.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

struct __half { uint16_t bits; };

inline float __half2float(__half h) {
  const uint32_t sign = uint32_t(h.bits & 0x8000u) << 16, exponent = (h.bits >> 10) & 0x1fu, mantissa = h.bits & 0x3ffu;
  float magnitude;
  if (exponent == 0) magnitude = std::ldexp(float(mantissa), -24);                       // zero, subnormal
  else if (exponent == 31) magnitude = mantissa ? NAN : INFINITY;                        // inf, NaN
  else magnitude = std::ldexp(float(mantissa | 0x400u), int(exponent) - 25);              // normal
  uint32_t w;
  std::memcpy(&w, &magnitude, 4);
  w |= sign;
  float f;
  std::memcpy(&f, &w, 4);
  return f;
}

inline __half __float2half_rn(float f) {
  uint32_t w;
  std::memcpy(&w, &f, 4);
  const uint16_t sign = uint16_t((w >> 16) & 0x8000u);
  const float a = std::fabs(f);
  if (std::isnan(f)) return {uint16_t(sign | 0x7e00u)};
  if (a >= 65520.0f) return {uint16_t(sign | 0x7c00u)};                                  // rounds to inf
  if (a < 6.103515625e-05f) {                                                             // subnormal: multiple of 2^-24
    return {uint16_t(sign | uint16_t(std::nearbyint(a * 16777216.0f)))};                  // default rounding: to even
  }
  int exponent;
  const float m = std::frexp(a, &exponent);                                               // a = m 2^e, m in [0.5, 1)
  uint32_t mantissa = uint32_t(std::nearbyint(std::ldexp(m, 11)));                        // 11 significant bits, to even
  if (mantissa == 2048u) mantissa = 1024u, ++exponent;
  return {uint16_t(sign | uint16_t((exponent + 14) << 10) | uint16_t(mantissa & 0x3ffu))};
}
