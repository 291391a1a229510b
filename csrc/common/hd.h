#pragma once
// ISG_HD marks functions compiled for both the host and the device (nvcc); plain inline in C++.
// In the emulation build (ISG_EMU) the .cu files are C++ too, and their "device" copies of these
// functions differ from the host ones (__CUDA_ARCH__ branches): internal linkage keeps the two
// apart (as inline functions they would be merged by the linker, an ODR violation).
#if defined(ISG_EMU)
#define ISG_HD static inline
#elif defined(__CUDACC__)
#define ISG_HD __host__ __device__ __forceinline__
#else
#define ISG_HD inline
#endif
