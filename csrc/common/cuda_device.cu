// Device discovery through the statically linked CUDA runtime: answers 0 (not
// an error) on machines without a driver or GPU, so `import isg._C` never fails.
#include <cuda_runtime.h>

#include <cstdio>

#include "common/cuda_device.h"

namespace isg {

int cuda_device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return count;
}

const char* cuda_runtime_version() {
  static char buffer[32];
  int version = 0;
  cudaRuntimeGetVersion(&version);
  snprintf(buffer, sizeof(buffer), "%d.%d", version / 1000, (version % 1000) / 10);
  return buffer;
}

}  // namespace isg
