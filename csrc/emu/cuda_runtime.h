// cudaemu: the subset of CUDA that mrprune's torch-free device code (csrc/include/mrprune/kernels/*.cuh) uses,
// executed on the CPU with the host C++ compiler, for tests in CI (no GPU needed).
//
// Put csrc/emu first on the include path and define MRPRUNE_CUDA_EMULATION: the kernel headers' own
// `#include <cuda_runtime.h>` then lands here and the real CUDA headers are never seen. Execution model
// (csrc/emu/runtime.cpp):
//   * every CUDA thread is a fiber (its own stack, switched by a small context switch); a fiber runs until it
//     blocks (barrier, warp collective, __nanosleep, exit), then the block's scheduler picks the next one in the
//     configured order (forward, reverse or random);
//   * every block runs on its own OS thread, so `__shared__` is `thread_local` (static shared arrays are per block;
//     `extern __shared__` arrays are defined by the harness with the GPU's opt-in capacity, poisoned with NaN at
//     block start and bounds-checked through a canary after the requested size);
//   * a cooperative launch starts all its blocks at once on co-resident OS threads (spin-waits across blocks
//     really run); a plain launch runs its blocks on a small pool of OS threads;
//   * __syncthreads is a block barrier that fails when threads reach different __syncthreads calls or when a
//     thread exits while others wait; warp collectives (__shfl_*_sync, __ballot_sync, __syncwarp, the WMMA
//     functions of mma.h) check their mask against the lanes that actually arrive at the same call; a watchdog ends
//     a launch that never finishes. Stricter than sm_70+'s independent thread scheduling: while lanes wait at a
//     collective, every lane of its mask must arrive at that same call next (a warp has one pending collective, so
//     e.g. half a warp may not __syncwarp(0x0000ffff) while the other half waits at a full-warp collective, and lanes
//     may not meet at different __syncwarp call sites).
// Half precision and WMMA: cuda_fp16.h, cuda_bf16.h and mma.h in this folder.
// A detected error prints what happened (kernel, block, thread, source line) to stderr and ends the process with
// exit code 86 (87: watchdog timeout); run emulated launches in a subprocess.
#pragma once

#if !defined(MRPRUNE_CUDA_EMULATION)
#error "csrc/emu/cuda_runtime.h is the CPU emulation of CUDA: build with -DMRPRUNE_CUDA_EMULATION"
#endif

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <source_location>
#include <type_traits>

// --- qualifiers ----------------------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// One OS thread per block: a thread-local variable is a per-block variable. Block-scope `extern __shared__` arrays
// need -fno-extern-tls-init (GCC would otherwise call a TLS init function that does not exist).
#define __shared__ thread_local

// --- built-in types --------------------------------------------------------------------------------------------------
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using uint3 = dim3;

struct alignas(16) float4 {
  float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };

// --- built-in variables ----------------------------------------------------------------------------------------------
// threadIdx is switched with the running fiber; the others are fixed for the block's OS thread.
inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

namespace cudaemu {

// --- runtime entry points (runtime.cpp) ------------------------------------------------------------------------------
void syncthreads(int line, const char* file);
int syncthreads_count(int predicate, int line, const char* file);
// kind: 0 shfl_xor, 1 shfl_down, 2 ballot. Returns the lane's result as raw bits.
uint32_t warp_collective(int kind, unsigned mask, uint32_t value, int arg, int line, const char* file);
// A warp-collective call named `name` (in diagnoses) that every lane of `mask` makes at the same call site with the
// same `count` (<= 3) arguments `args`, called `labels[i]` in diagnoses (e.g. __syncwarp, the WMMA functions).
// `orders_memory`: the lanes' memory accesses before the call happen before those after it (__syncwarp; for
// ThreadSanitizer: a release/acquire), otherwise the call only checks that the lanes meet.
void warp_uniform(const char* name, unsigned mask, int count, const uint64_t* args, const char* const* labels,
                  bool orders_memory, int line, const char* file);
// Ends the run with a diagnosis of the running CUDA thread (kernel, block, thread, source line) and exit code 86.
[[noreturn]] void kernel_error(int line, const char* file, const char* format, ...)
    __attribute__((format(printf, 3, 4)));
void nanosleep_yield();

template <class T>
uint32_t to_bits(T v) {
  static_assert(sizeof(T) == 4, "warp collectives of 32-bit values only");
  uint32_t b;
  std::memcpy(&b, &v, 4);
  return b;
}
template <class T>
T from_bits(uint32_t b) {
  T v;
  std::memcpy(&v, &b, 4);
  return v;
}

// --- launches (used by the harness, never by device code) -----------------------------------------------------------
// Dynamic shared memory of a kernel: its thread-local backing array on the calling OS thread and that array's size.
struct DynamicShared {
  void* (*base)();  // the current OS thread's array (a thread_local defined by the harness)
  size_t capacity;  // bytes
};

// Launches `body` on grid x block threads and waits for it. `name` labels error messages. A cooperative launch needs
// grid.x * grid.y * grid.z <= max_coresident (the blocks a GPU would hold at once) and runs every block at once.
void launch(const char* name, dim3 grid, dim3 block, size_t dynamic_bytes, const DynamicShared* shared,
            bool cooperative, int max_coresident, const std::function<void()>& body);

// Scheduling of the fibers of a block between sync points: 0 forward, 1 reverse, 2 random (seeded); the watchdog
// timeout in seconds; plain launches' OS threads. Defaults come from CUDAEMU_SCHED (fwd|rev|rand), CUDAEMU_SEED,
// CUDAEMU_TIMEOUT and CUDAEMU_WORKERS.
void configure(int order, uint64_t seed, double timeout_s, int workers);

}  // namespace cudaemu

// --- synchronisation -------------------------------------------------------------------------------------------------
#define __syncthreads() ::cudaemu::syncthreads(__LINE__, __FILE__)
#define __syncthreads_count(p) ::cudaemu::syncthreads_count((p) ? 1 : 0, __LINE__, __FILE__)
#define __shfl_xor_sync(mask, v, lane_mask) \
  ::cudaemu::from_bits<std::decay_t<decltype(v)>>(        \
      ::cudaemu::warp_collective(0, (mask), ::cudaemu::to_bits(v), (lane_mask), __LINE__, __FILE__))
#define __shfl_down_sync(mask, v, delta) \
  ::cudaemu::from_bits<std::decay_t<decltype(v)>>(     \
      ::cudaemu::warp_collective(1, (mask), ::cudaemu::to_bits(v), (delta), __LINE__, __FILE__))
#define __ballot_sync(mask, p) ::cudaemu::warp_collective(2, (mask), (p) ? 1u : 0u, 0, __LINE__, __FILE__)

// A function rather than a macro (its mask is optional): the caller's line comes from std::source_location.
inline void __syncwarp(unsigned mask = 0xffffffffu, std::source_location at = std::source_location::current()) {
  ::cudaemu::warp_uniform("__syncwarp", mask, 0, nullptr, nullptr, true, static_cast<int>(at.line()), at.file_name());
}

inline void __nanosleep(unsigned) { ::cudaemu::nanosleep_yield(); }
// The C++ memory model on the host: a sequentially consistent fence (at least as strong as the GPU's fence.sc.gpu).
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

// --- memory access: cache hints have no meaning on the CPU -----------------------------------------------------------
template <class T>
inline T __ldg(const T* p) {
  return *p;
}
template <class T>
inline T __ldcg(const T* p) {
  return *p;
}
template <class T>
inline void __stcg(T* p, T v) {
  *p = v;
}

// --- math and bits -----------------------------------------------------------------------------------------------------
inline float __int_as_float(int v) { return cudaemu::from_bits<float>(static_cast<uint32_t>(v)); }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
// fmaf, fminf, fmaxf, sqrtf: the C library's (<cmath>), correctly rounded like the GPU's.
