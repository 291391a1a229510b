// isg._C: one pybind11 module and its one binding table. Every kernel entry point is a plain function
// over raw pointers and sizes named <op>_cpu (host pointers, + num_threads) or <op>_cuda (device
// pointers, + a cudaStream_t), and is bound under that name by ISG_BIND below (common/bind.h).
#include <pybind11/pybind11.h>

#include "common/bind.h"
#ifdef ISG_WITH_CUDA
#include "common/cuda_device.h"
#endif
#ifdef ISG_WITH_SHANNON
#include "shannon/shannon.h"
#endif
#ifdef ISG_WITH_ATTENTION
#include "attention/attention.h"
#endif

namespace py = pybind11;

namespace isg {
#ifdef ISG_WITH_SHANNON
template <>
struct Wire<shannon::TileBatch> {  // (base, offsets, tiles, height, width, channels, stride_h, stride_w, stride_c)
  using type = std::tuple<uintptr_t, uintptr_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t>;
  static shannon::TileBatch from(const type& t) {
    const auto [base, offsets, tiles, height, width, channels, stride_h, stride_w, stride_c] = t;
    return {reinterpret_cast<const uint8_t*>(base), reinterpret_cast<const int64_t*>(offsets), tiles, height, width,
            channels, stride_h, stride_w, stride_c};
  }
};
#endif
#ifdef ISG_WITH_ATTENTION
template <>
struct Wire<attention::Shape> {  // (M, C, L, shared_over_channels)
  using type = std::tuple<int64_t, int64_t, int64_t, bool>;
  static attention::Shape from(const type& t) { return {std::get<0>(t), std::get<1>(t), std::get<2>(t), std::get<3>(t)}; }
};
#endif
#ifdef ISG_EMU
void register_emu_probes(py::module_& m);
#endif
}  // namespace isg

#define ISG_DEF(m, name, fn, doc) m.def(name, &::isg::Bound<&fn>::call, doc)
#ifdef ISG_WITH_CUDA
#define ISG_DEF_CUDA(m, name, fn, doc) ISG_DEF(m, name "_cuda", fn##_cuda, doc " [CUDA: device pointers, last argument a stream]")
#else
#define ISG_DEF_CUDA(m, name, fn, doc)
#endif
// <name>_cpu and, in CUDA builds, <name>_cuda, bound to fn_cpu / fn_cuda.
#define ISG_BIND(m, name, fn, doc)                                                            \
  ISG_DEF(m, name "_cpu", fn##_cpu, doc " [CPU: host pointers, last argument num_threads]"); \
  ISG_DEF_CUDA(m, name, fn, doc)

PYBIND11_MODULE(_C, m) {
  m.doc() = "isg native kernels (CPU C++ and, when built with nvcc, CUDA)";
#ifdef ISG_WITH_CUDA
  m.attr("built_with_cuda") = true;
  m.def("cuda_device_count", &isg::cuda_device_count, "CUDA devices visible to the static runtime (0 without a driver)");
  m.def("cuda_runtime_version", &isg::cuda_runtime_version);
  m.def("cuda_runtime_version_code", &isg::cuda_runtime_version_code, "version of the static CUDA runtime (13000 = 13.0)");
  m.def("cuda_driver_version_code", &isg::cuda_driver_version_code, "CUDA version the driver supports (0: no driver)");
  m.def("cuda_device_error", &isg::cuda_device_error, "cudaError_t of cudaGetDeviceCount (0: success)");
#else
  m.attr("built_with_cuda") = false;
  m.def("cuda_device_count", []() { return 0; });
#endif
#ifdef ISG_WITH_SHANNON
  ISG_BIND(m, "shannon_histogram", isg::shannon::histogram,
           "(tiles: (base, offsets, tiles, H, W, C, stride_h, stride_w, stride_c), hist) residual histograms int32 "
           "[tiles, C, 256] of uint8 tiles at base + offsets[t] (element offsets, int64)");
  ISG_DEF(m, "shannon_bits_cpu", isg::shannon::bits_cpu,
          "(hist, tiles, channels, bits, num_threads) bits float64 [tiles] of int64 histograms [tiles, channels, 256] "
          "(host pointers; bits are computed on the host for histograms from any device)");
#endif
#ifdef ISG_WITH_ATTENTION
  // Every attention entry point: (pointers..., (M, C, L, shared_over_channels), dtype code, num_threads | stream).
  ISG_BIND(m, "gated_hadamard_forward", isg::attention::gated_hadamard_forward,
           "(q, k, v, out, shape, dtype) out = sigmoid(q * k) * v; q [M, 1, L] (shared_over_channels) or [M, C, 1], "
           "k, v, out [M, C, L]");
  ISG_BIND(m, "gated_hadamard_backward", isg::attention::gated_hadamard_backward,
           "(grad, q, k, v, grad_q, grad_k, grad_v, shape, dtype) gradients of gated_hadamard");
  ISG_BIND(m, "softmax_spatial_sum_forward", isg::attention::softmax_spatial_sum_forward,
           "(logits, p, out, shape, dtype) out[m, c] = sum_j softmax_j(logits) p[m, c, j]; logits [M, 1, L] "
           "(shared_over_channels) or [M, C, L]");
  ISG_BIND(m, "softmax_spatial_sum_backward", isg::attention::softmax_spatial_sum_backward,
           "(grad, logits, p, grad_logits, grad_p, shape, dtype) gradients of softmax_spatial_sum (the forward output "
           "is recomputed in float)");
#endif
#ifdef ISG_EMU
  isg::register_emu_probes(m);
#endif
}
