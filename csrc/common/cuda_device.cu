// Device discovery through the statically linked CUDA runtime: answers 0 (not an error) on machines
// without a driver or GPU, so `import isg._C` never fails; `isg info` reports why CUDA is unusable.
#include <cuda_runtime.h>

#include <cstdio>

#include "common/cuda_device.h"

namespace isg {

int cuda_device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" / "driver too old" error
    return 0;
  }
  return count;
}

int cuda_device_error() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  cudaGetLastError();
  return int(err);
}

int cuda_runtime_version_code() {
  int version = 0;
  cudaRuntimeGetVersion(&version);
  return version;
}

int cuda_driver_version_code() {
  int version = 0;  // 0 when no driver is installed
  if (cudaDriverGetVersion(&version) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return version;
}

const char* cuda_runtime_version() {
  static char buffer[32];
  const int version = cuda_runtime_version_code();
  snprintf(buffer, sizeof(buffer), "%d.%d", version / 1000, (version % 1000) / 10);
  return buffer;
}

}  // namespace isg
