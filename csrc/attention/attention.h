#pragma once
// Fused Dual Attention ops (isg/ops/attention.py) over [M, C, L] tensors (batch M, channels C,
// local positions L), in two broadcast forms of the small operand (q, logits):
//   paper form (`shared_over_channels`): q, logits [M, 1, L], one value per position (Eq. 3, 6);
//   plus form:                           q [M, C, 1] (one per channel), logits [M, C, L].
//   gated_hadamard:      out[m, c, j] = sigmoid(q[m, ., .] * k[m, c, j]) * v[m, c, j]
//   softmax_spatial_sum: out[m, c]    = sum_j softmax_j(logits[m, ., :]) * p[m, c, j]
// Backward reduces the gradient of the small operand over its broadcast axis (positions for the
// plus q, channels for the paper q and logits). Plain functions over raw pointers, sizes and (CUDA)
// a stream; math in float (double for double), storage in the tensor's dtype.
#include <cstdint>
#include <initializer_list>
#include <string>

#include "common/check.h"

namespace isg {
namespace attention {

// Codes shared with isg/ops/attention.py (_DTYPE_CODES).
enum class DType : int { Float32 = 0, Float64 = 1, Float16 = 2, BFloat16 = 3 };

struct Shape {
  int64_t batch, channels, length;  // M, C, L
  bool shared_over_channels;        // paper form: q / logits are [M, 1, L]
};

// Runs fn(T{}) with T the storage type of `dtype`: float, double, then the half and bfloat16 types of
// the caller's device (CPU: bit containers; CUDA: __half, __nv_bfloat16).
template <typename Half, typename BFloat16, typename F>
void dispatch(DType dtype, F&& fn) {
  switch (dtype) {
    case DType::Float32: return fn(float{});
    case DType::Float64: return fn(double{});
    case DType::Float16: return fn(Half{});
    case DType::BFloat16: return fn(BFloat16{});
  }
  ISG_CHECK(false, "attention: dtype code must be 0 (float32), 1 (float64), 2 (float16) or 3 (bfloat16), got " +
                       std::to_string(int(dtype)));
}

// Sizes >= 0 and, unless the op is empty, no null pointer (both devices check alike).
inline void check_args(const char* op, const Shape& s, std::initializer_list<const void*> pointers) {
  ISG_CHECK(s.batch >= 0 && s.channels >= 0 && s.length >= 0,
            std::string(op) + ": negative size (M=" + std::to_string(s.batch) + ", C=" + std::to_string(s.channels) +
                ", L=" + std::to_string(s.length) + ")");
  if (s.batch * s.channels * s.length == 0) return;
  for (const void* p : pointers) ISG_CHECK(p != nullptr, std::string(op) + ": null data pointer");
}

// CPU (OpenMP over M; `num_threads` <= 0: OpenMP's default).
void gated_hadamard_forward_cpu(const void* q, const void* k, const void* v, void* out, Shape shape, DType dtype, int num_threads);
void gated_hadamard_backward_cpu(const void* grad, const void* q, const void* k, const void* v, void* grad_q, void* grad_k,
                                 void* grad_v, Shape shape, DType dtype, int num_threads);
void softmax_spatial_sum_forward_cpu(const void* logits, const void* p, void* out, Shape shape, DType dtype, int num_threads);
void softmax_spatial_sum_backward_cpu(const void* grad, const void* logits, const void* p, void* grad_logits, void* grad_p,
                                      Shape shape, DType dtype, int num_threads);

#ifdef ISG_WITH_CUDA
// CUDA launchers (attention_cuda.cu); device pointers, asynchronous on `stream` (a cudaStream_t).
void gated_hadamard_forward_cuda(const void* q, const void* k, const void* v, void* out, Shape shape, DType dtype, void* stream);
void gated_hadamard_backward_cuda(const void* grad, const void* q, const void* k, const void* v, void* grad_q, void* grad_k,
                                  void* grad_v, Shape shape, DType dtype, void* stream);
void softmax_spatial_sum_forward_cuda(const void* logits, const void* p, void* out, Shape shape, DType dtype, void* stream);
void softmax_spatial_sum_backward_cuda(const void* grad, const void* logits, const void* p, void* grad_logits, void* grad_p,
                                       Shape shape, DType dtype, void* stream);
#endif

}  // namespace attention
}  // namespace isg
