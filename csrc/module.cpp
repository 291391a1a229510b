// isg._C: one pybind11 module; each kernel family registers its functions.
#include <pybind11/pybind11.h>

#ifdef ISG_WITH_CUDA
#include "common/cuda_device.h"
#endif

namespace py = pybind11;

namespace isg {
void register_shannon(py::module_& m);
void register_attention(py::module_& m);
#ifdef ISG_EMU
void register_emu_probes(py::module_& m);
#endif
}  // namespace isg

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
  isg::register_shannon(m);
#endif
#ifdef ISG_WITH_ATTENTION
  isg::register_attention(m);
#endif
#ifdef ISG_EMU
  isg::register_emu_probes(m);
#endif
}
