#pragma once

namespace isg {
int cuda_device_count();
const char* cuda_runtime_version();
}  // namespace isg
