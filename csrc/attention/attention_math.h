#pragma once
// Per-element formulas shared by the CPU and CUDA kernels, so both paths
// compute the same thing. `acc_t` is float (double for double tensors).
#include <cmath>
#include <cstdint>

#include "common/hd.h"

namespace isg {
namespace attention {

// exp in float: libm-accurate expf on the device (these kernels are memory-bound: no __expf);
// on the host a branch-free Cephes-style polynomial (~1 ulp) that the compiler vectorises (libm's
// expf does not). Defined for every input: NaN -> NaN (the exponent is taken from a NaN-free copy,
// so no NaN is ever converted to int), out-of-range inputs saturate at exp(-87) and exp(88).
ISG_HD float exp_acc(float x) {
#ifdef __CUDA_ARCH__
  return expf(x);
#else
  x = x < -87.0f ? -87.0f : x;  // ternaries, not fminf/fmaxf: these vectorise (NaN passes through)
  x = x > 88.0f ? 88.0f : x;
  const float finite = x == x ? x : 0.0f;
  const float fx = finite * 1.44269504088896341f;  // x / ln 2, in [-125.6, 127]
  const int n = static_cast<int>(fx + (fx >= 0.0f ? 0.5f : -0.5f));
  const float nf = static_cast<float>(n);
  const float r = (x - nf * 0.693359375f) + nf * 2.12194440e-4f;  // x - n ln 2 in two parts (NaN stays NaN)
  float poly = 1.9875691500e-4f;
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  const float er = poly * r * r + r + 1.0f;  // e^r, |r| <= ln 2 / 2
  union { uint32_t u; float f; } scale;
  scale.u = static_cast<uint32_t>(n + 127) << 23;  // 2^n, n + 127 in [1, 254]
  return er * scale.f;
#endif
}
ISG_HD double exp_acc(double x) { return exp(x); }

template <typename acc_t>
ISG_HD acc_t sigmoid(acc_t z) {
  return acc_t(1) / (acc_t(1) + exp_acc(-z));
}

// Forward of gated_hadamard for one element.
template <typename acc_t>
ISG_HD acc_t gated_forward(acc_t q, acc_t k, acc_t v) {
  return sigmoid(q * k) * v;
}

// Backward of gated_hadamard for one element: writes dL/dk and dL/dv, returns
// this element's contribution to dL/dq (summed over the row by the caller).
template <typename acc_t>
ISG_HD acc_t gated_backward(acc_t q, acc_t k, acc_t v, acc_t g, acc_t& grad_k, acc_t& grad_v) {
  const acc_t s = sigmoid(q * k);
  grad_v = g * s;
  const acc_t dz = g * v * s * (acc_t(1) - s);  // d/dz of sigmoid(z) * v, z = q * k
  grad_k = dz * q;
  return dz * k;
}

// Backward of softmax_spatial_sum (plus form) for one element with softmax weight w and row output out:
// dL/dp_j = g * w_j, dL/dlogit_j = g * w_j * (p_j - out).
template <typename acc_t>
ISG_HD void softmax_sum_backward(acc_t w, acc_t p, acc_t out, acc_t g, acc_t& grad_logit, acc_t& grad_p) {
  grad_p = g * w;
  grad_logit = grad_p * (p - out);
}

}  // namespace attention
}  // namespace isg
