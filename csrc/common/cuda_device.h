#pragma once

namespace isg {
int cuda_device_count();
int cuda_device_error();            // cudaError_t of cudaGetDeviceCount (0: success)
int cuda_runtime_version_code();    // e.g. 13000 for the static CUDA 13.0 runtime
int cuda_driver_version_code();     // CUDA version the driver supports (0: no driver)
const char* cuda_runtime_version();
}  // namespace isg
