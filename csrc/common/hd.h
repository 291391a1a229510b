#pragma once
// ISG_HD marks functions compiled for both the host and the device (nvcc); plain inline in C++.
#ifdef __CUDACC__
#define ISG_HD __host__ __device__ __forceinline__
#else
#define ISG_HD inline
#endif
