#pragma once
// Per-element formulas shared by the CPU and CUDA kernels, so both paths
// compute the same thing. `acc_t` is float (double for double tensors).
#include <cmath>

#ifdef __CUDACC__
#define ISG_HD __host__ __device__ __forceinline__
#else
#define ISG_HD inline
#endif

namespace isg {
namespace attention {

template <typename acc_t>
ISG_HD acc_t sigmoid(acc_t z) {
  return acc_t(1) / (acc_t(1) + exp(-z));
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

// Backward of softmax_spatial_sum for one element with softmax weight w and row output out:
// dL/dp_j = g * w_j, dL/dlogit_j = g * w_j * (p_j - out).
template <typename acc_t>
ISG_HD void softmax_sum_backward(acc_t w, acc_t p, acc_t out, acc_t g, acc_t& grad_logit, acc_t& grad_p) {
  grad_p = g * w;
  grad_logit = grad_p * (p - out);
}

}  // namespace attention
}  // namespace isg
