// cuda_emu.h: runs the project's CUDA kernels on the host, thread by thread, for tests without a GPU.
//
// Every CUDA thread is a ucontext fiber; a block's fibers are scheduled cooperatively by
// cuda_emu.cpp. A fiber runs until it reaches a synchronisation point (__syncthreads, a warp
// collective or __activemask), so these intrinsics are emulated with their real semantics:
//   * __syncthreads: releases when every live thread of the block waits at it; a thread that has
//     exited while others wait, or barriers at different call sites, are reported (UB in CUDA);
//   * __shfl*_sync / __all_sync / __any_sync / __ballot_sync / __match_any_sync: complete when every
//     lane named in the mask waits at the same collective with the same mask; a mask naming an
//     exited or nonexistent lane, a source lane outside the mask, or a mask that omits the caller
//     are reported;
//   * __activemask: the lanes of the warp waiting at the same __activemask call site when the warp
//     can go no further (lock-step model); ISG_EMU_SPLIT=1 splits such groups at random to mimic
//     independent thread scheduling (correct opportunistic code must not care);
//   * a block in which no thread can progress is reported as a deadlock.
// Blocks run one after another; __shared__ is `static`, i.e. one copy reused by consecutive blocks
// (a kernel that forgets to initialise shared memory sees the previous block's data).
// ISG_EMU_SCHED=warp (default: one warp races ahead, exposing a missing __syncthreads) | block
// (lock step); ISG_EMU_ORDER=forward|reverse|random; ISG_EMU_SEED. Atomics are plain
// read-modify-writes (fibers are never preempted). Float math is host IEEE.
//
// Self-contained: this header and include/cuda_*.h stand in for the CUDA toolkit's headers, so the
// emulation builds with a plain C++17 compiler (no nvcc, no CUDA headers). The only source rewrite
// is transform.py's `k<<<g, b, s, st>>>(args)` -> `::isg_emu::launcher(k, g, b, s, st)(args)`.
// __CUDA_ARCH__ is defined, so device-only branches are taken. Adapted from ../shared/cuda-emu.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>

#ifndef __CUDA_ARCH__
#define __CUDA_ARCH__ 900
#endif
#define __CUDACC__ 1
#define ISG_EMU 1

// ---------------------------------------------------------------------------- qualifiers and types
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct uint3 { unsigned x, y, z; };
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
inline uint3 make_uint3(unsigned x, unsigned y, unsigned z) { return {x, y, z}; }
struct uchar4 { uint8_t x, y, z, w; };
struct CUstream_st;
typedef CUstream_st* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9, cudaErrorNoDevice = 100 };

extern "C" {
cudaError_t cudaGetLastError(void);
cudaError_t cudaPeekAtLastError(void);
const char* cudaGetErrorString(cudaError_t e);
cudaError_t cudaGetDeviceCount(int* count);
cudaError_t cudaRuntimeGetVersion(int* version);
cudaError_t cudaDriverGetVersion(int* version);
cudaError_t cudaMemsetAsync(void* dst, int value, size_t bytes, cudaStream_t stream);
}

namespace isg_emu {

enum class Op : int { None = 0, SyncThreads, ActiveMask, Shfl, ShflXor, ShflUp, ShflDown, All, Any, Ballot, MatchAny };

uint3& thread_idx();
uint3& block_idx();
dim3& block_dim();
dim3& grid_dim();
// blocks the calling fiber at a sync point; returns the collective's result
uint64_t sync_point(Op op, unsigned mask, uint64_t value, int arg, int width, int line);
void run_kernel(const dim3& grid, const dim3& block, size_t shmem, cudaStream_t stream, std::function<void()> body);
struct Stats { uint64_t launches, blocks, threads, sync_points; };
Stats& stats();

template <class K>
struct Launcher {
  K* kernel;
  dim3 grid, block;
  size_t shmem;
  cudaStream_t stream;
  template <class... A>
  void operator()(A... args) const {
    K* k = kernel;
    run_kernel(grid, block, shmem, stream, [=]() { k(args...); });
  }
};
template <class K>
Launcher<K> launcher(K* kernel, dim3 grid, dim3 block, size_t shmem = 0, cudaStream_t stream = 0) {
  return Launcher<K>{kernel, grid, block, shmem, stream};
}

template <class T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8, "shuffle of a type wider than 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <class T>
inline T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}
template <class T>
inline T shfl(Op op, unsigned mask, T var, int line, int arg, int width = 32) {
  return from_bits<T>(sync_point(op, mask, to_bits(var), arg, width, line));
}

}  // namespace isg_emu

#define threadIdx (::isg_emu::thread_idx())
#define blockIdx (::isg_emu::block_idx())
#define blockDim (::isg_emu::block_dim())
#define gridDim (::isg_emu::grid_dim())
#define warpSize 32

#define __syncthreads() ((void)::isg_emu::sync_point(::isg_emu::Op::SyncThreads, 0u, 0, 0, 32, __LINE__))
#define __activemask() (unsigned(::isg_emu::sync_point(::isg_emu::Op::ActiveMask, 0u, 0, 0, 32, __LINE__)))
#define __shfl_sync(mask, var, ...) ::isg_emu::shfl(::isg_emu::Op::Shfl, (mask), (var), __LINE__, __VA_ARGS__)
#define __shfl_xor_sync(mask, var, ...) ::isg_emu::shfl(::isg_emu::Op::ShflXor, (mask), (var), __LINE__, __VA_ARGS__)
#define __shfl_up_sync(mask, var, ...) ::isg_emu::shfl(::isg_emu::Op::ShflUp, (mask), (var), __LINE__, __VA_ARGS__)
#define __shfl_down_sync(mask, var, ...) ::isg_emu::shfl(::isg_emu::Op::ShflDown, (mask), (var), __LINE__, __VA_ARGS__)
#define __all_sync(mask, pred) int(::isg_emu::sync_point(::isg_emu::Op::All, (mask), uint64_t(bool(pred)), 0, 32, __LINE__))
#define __any_sync(mask, pred) int(::isg_emu::sync_point(::isg_emu::Op::Any, (mask), uint64_t(bool(pred)), 0, 32, __LINE__))
#define __ballot_sync(mask, pred) unsigned(::isg_emu::sync_point(::isg_emu::Op::Ballot, (mask), uint64_t(bool(pred)), 0, 32, __LINE__))
#define __match_any_sync(mask, value) \
  unsigned(::isg_emu::sync_point(::isg_emu::Op::MatchAny, (mask), ::isg_emu::to_bits(value), 0, 32, __LINE__))

// ---------------------------------------------------------------------------- other intrinsics
namespace isg_emu {
[[noreturn]] void misaligned(const void* p, size_t alignment);
}
template <class T>
inline T __ldg(const T* p) {  // a misaligned load is cudaErrorMisalignedAddress on the GPU (x86 would just read it)
  if (reinterpret_cast<uintptr_t>(p) % alignof(T)) isg_emu::misaligned(p, alignof(T));
  return *p;
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(unsigned(x)); }
inline unsigned __umulhi(unsigned a, unsigned b) { return unsigned((uint64_t(a) * b) >> 32); }
template <class T>
inline T atomicAdd(T* address, T value) { T old = *address; *address = old + value; return old; }

// Shared-space addresses (32-bit on the GPU): here the byte offset from a fixed static of this module.
// The emulated __shared__ arrays are statics of the same module, so their offsets fit in 32 bits; an
// address that does not (not a __shared__ variable: undefined in CUDA) is reported.
namespace isg_emu {
extern char shared_window[];
[[noreturn]] void not_shared(const void* p);
}  // namespace isg_emu
inline size_t __cvta_generic_to_shared(const void* p) {
  const int64_t offset = int64_t(reinterpret_cast<uintptr_t>(p) - reinterpret_cast<uintptr_t>(isg_emu::shared_window));
  if (offset != int64_t(int32_t(offset))) isg_emu::not_shared(p);
  return size_t(uint32_t(int32_t(offset)));
}
inline void* __cvta_shared_to_generic(size_t address) {  // integer arithmetic: no pointer past shared_window's bounds
  return reinterpret_cast<void*>(reinterpret_cast<uintptr_t>(isg_emu::shared_window) + uintptr_t(int64_t(int32_t(uint32_t(address)))));
}

// Integer intrinsics of the CUDA Math API (semantics as documented there and in the PTX ISA; each is
// tested against an independent model in tests/test_emulated_kernels.py::test_emulated_intrinsics).
// __funnelshift_lc: the high word of (hi:lo) << min(shift, 32).
inline unsigned __funnelshift_lc(unsigned lo, unsigned hi, unsigned shift) {
  const unsigned s = shift < 32u ? shift : 32u;
  return unsigned(((uint64_t(hi) << 32 | lo) << s) >> 32);
}
// __byte_perm (PTX prmt.b32, default mode): byte n of the result is byte (s >> 4n) & 7 of the
// 8 bytes {y:x} (x = bytes 0..3); if bit 3 of that nibble is set, the selected byte's sign is replicated.
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const uint64_t bytes = uint64_t(y) << 32 | x;
  unsigned r = 0;
  for (int n = 0; n < 4; ++n) {
    const unsigned nibble = (s >> (4 * n)) & 15u;
    unsigned byte = unsigned(bytes >> (8 * (nibble & 7u))) & 255u;
    if (nibble & 8u) byte = (byte & 128u) ? 255u : 0u;
    r |= byte << (8 * n);
  }
  return r;
}
// DPX (Hopper): per 16-bit half, the unsigned maximum / minimum of three values.
inline unsigned __vimax3_u16x2(unsigned a, unsigned b, unsigned c) {
  unsigned r = 0;
  for (int h = 0; h < 32; h += 16) {
    const unsigned x = (a >> h) & 0xffffu, y = (b >> h) & 0xffffu, z = (c >> h) & 0xffffu;
    r |= (x > y ? (x > z ? x : z) : (y > z ? y : z)) << h;
  }
  return r;
}
inline unsigned __vimin3_u16x2(unsigned a, unsigned b, unsigned c) {
  unsigned r = 0;
  for (int h = 0; h < 32; h += 16) {
    const unsigned x = (a >> h) & 0xffffu, y = (b >> h) & 0xffffu, z = (c >> h) & 0xffffu;
    r |= (x < y ? (x < z ? x : z) : (y < z ? y : z)) << h;
  }
  return r;
}

// device math overloads (CUDA's min/max are global functions; max(float, float) is fmaxf: NaN-dropping)
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }

// check.h defines ISG_CUDA_CHECK only under nvcc's __CUDACC__ with <cuda_runtime.h>: same here.
#include "cuda_fp16.h"
#include "cuda_bf16.h"
