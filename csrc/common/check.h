#pragma once
// Small helpers shared by kernel families: argument checks that raise Python
// ValueError through pybind11, and CUDA error checks.
#include <stdexcept>
#include <string>

#define ISG_CHECK(cond, msg)                                   \
  do {                                                         \
    if (!(cond)) throw std::invalid_argument(std::string(msg)); \
  } while (0)

#ifdef __CUDACC__
#include <cuda_runtime.h>
#define ISG_CUDA_CHECK(expr)                                                      \
  do {                                                                            \
    cudaError_t err__ = (expr);                                                   \
    if (err__ != cudaSuccess)                                                     \
      throw std::runtime_error(std::string("CUDA error: ") + cudaGetErrorString(err__) + \
                               " at " __FILE__ ":" + std::to_string(__LINE__));    \
  } while (0)
#endif
