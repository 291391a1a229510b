#pragma once
// Fused Dual Attention ops (isg/ops/attention.py):
//   gated_hadamard:      out[r, j] = sigmoid(q[r] * k[r, j]) * v[r, j]
//   softmax_spatial_sum: out[r]    = sum_j softmax_j(logits[r, :]) * p[r, j]
// over rows r = (m, c) of [M, C, L] tensors (q and out of the second op are [M, C]).
// Plain functions over raw pointers, sizes and (CUDA) a stream; math in float
// (double for double), storage in the tensor's dtype.
#include <cstdint>

namespace isg {
namespace attention {

// Codes shared with isg/ops/attention.py (_DTYPE_CODES).
enum class DType : int { Float32 = 0, Float64 = 1, Float16 = 2, BFloat16 = 3 };

// CPU (OpenMP over rows).
void gated_hadamard_forward_cpu(const void* q, const void* k, const void* v, void* out, int64_t rows, int64_t length, DType dtype);
void gated_hadamard_backward_cpu(const void* grad, const void* q, const void* k, const void* v, void* grad_q, void* grad_k,
                                 void* grad_v, int64_t rows, int64_t length, DType dtype);
void softmax_spatial_sum_forward_cpu(const void* logits, const void* p, void* out, int64_t rows, int64_t length, DType dtype);
void softmax_spatial_sum_backward_cpu(const void* grad, const void* logits, const void* p, void* grad_logits, void* grad_p,
                                      int64_t rows, int64_t length, DType dtype);

#ifdef ISG_WITH_CUDA
// CUDA launchers (attention_cuda.cu); `stream` is a cudaStream_t.
void gated_hadamard_forward_cuda(const void* q, const void* k, const void* v, void* out, int64_t rows, int64_t length, DType dtype,
                                 void* stream);
void gated_hadamard_backward_cuda(const void* grad, const void* q, const void* k, const void* v, void* grad_q, void* grad_k,
                                  void* grad_v, int64_t rows, int64_t length, DType dtype, void* stream);
void softmax_spatial_sum_forward_cuda(const void* logits, const void* p, void* out, int64_t rows, int64_t length, DType dtype,
                                      void* stream);
void softmax_spatial_sum_backward_cuda(const void* grad, const void* logits, const void* p, void* grad_logits, void* grad_p,
                                       int64_t rows, int64_t length, DType dtype, void* stream);
#endif

}  // namespace attention
}  // namespace isg
