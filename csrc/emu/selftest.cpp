// Small kernels that check the emulator itself (tests/test_cuda_emulation.py): the semantics of its warp
// collectives and barriers, and that each class of GPU bug it claims to detect ends the run with a diagnosis.
#include <cstdint>
#include <vector>

#include "cuda_runtime.h"

namespace {

// The array behind the `extern __shared__` declaration of dynamic_shared_overflow (same namespace).
alignas(16) thread_local float smem[1024];
const cudaemu::DynamicShared kShared{[]() -> void* { return smem; }, sizeof(smem)};

template <class F>
void run(const char* name, dim3 grid, dim3 block, size_t dynamic_bytes, bool cooperative, F&& body) {
  cudaemu::launch(name, grid, block, dynamic_bytes, dynamic_bytes > 0 ? &kShared : nullptr, cooperative,
                  static_cast<int>(grid.x), std::function<void()>(body));
}

// Correct collectives: out[t] = {xor-butterfly sum of the warp, shfl_down by 3 (own value past the warp), ballot of
// odd lanes, __syncthreads_count of t < 40, the block sum through shared memory}.
__global__ void semantics(int* out) {
  __shared__ int partial[2];
  const int t = static_cast<int>(threadIdx.x), lane = t & 31, warp = t >> 5;
  int sum = t;
  for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  const int down = __shfl_down_sync(0xffffffffu, t, 3);
  const unsigned odd = __ballot_sync(0xffffffffu, lane & 1);
  const int count = __syncthreads_count(t < 40);
  if (lane == 0) partial[warp] = sum;
  __syncthreads();
  out[t * 5 + 0] = sum;
  out[t * 5 + 1] = down;
  out[t * 5 + 2] = static_cast<int>(odd);
  out[t * 5 + 3] = count;
  out[t * 5 + 4] = partial[0] + partial[1];
}

__global__ void divergent_barriers() {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncthreads();
  }
}

__global__ void exit_before_barrier() {
  if (threadIdx.x == 5) return;
  __syncthreads();
}

__global__ void divergent_shuffle(int* out) {
  int v = static_cast<int>(threadIdx.x);
  if ((threadIdx.x & 31) < 16) v += __shfl_xor_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

__global__ void shuffle_mask_without_self(int* out) {
  out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, static_cast<int>(threadIdx.x), 1);
}

__global__ void shuffle_reads_outside_mask(int* out) {
  const unsigned lane = threadIdx.x & 31;
  if (lane < 16) out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, static_cast<int>(lane), 16);
}

__global__ void dynamic_shared_overflow(int n) {
  extern __shared__ float smem[];
  for (int i = static_cast<int>(threadIdx.x); i <= n; i += static_cast<int>(blockDim.x)) smem[i] = 1.f;
}

// Block 0 waits for a flag nobody sets: only the watchdog ends it.
__global__ void grid_deadlock(int* flag) {
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    while (__atomic_load_n(flag, __ATOMIC_ACQUIRE) == 0) __nanosleep(100);
  }
}

// Thread 1 reads what thread 0 wrote to shared memory without a barrier in between: a race only ThreadSanitizer
// (or luck with the schedule) reports.
__global__ void shared_race(int* out) {
  __shared__ int value;
  if (threadIdx.x == 0) value = 42;
  if (threadIdx.x == 1) out[0] = value;
}

// The same with the barrier: no race.
__global__ void shared_no_race(int* out) {
  __shared__ int value;
  if (threadIdx.x == 0) value = 42;
  __syncthreads();
  if (threadIdx.x == 1) out[0] = value;
}

}  // namespace

extern "C" {

// Runs self-test `which`; out receives 64 * 5 ints for "semantics". Returns 0 (errors end the process).
int emu_selftest(int which, int* out) {
  std::vector<int> scratch(64 * 5, 0);
  int* o = out != nullptr ? out : scratch.data();
  static int flag = 0;
  switch (which) {
    case 0:
      run("semantics", dim3(1), dim3(64), 0, false, [&] { semantics(o); });
      break;
    case 1:
      run("divergent_barriers", dim3(1), dim3(64), 0, false, [] { divergent_barriers(); });
      break;
    case 2:
      run("exit_before_barrier", dim3(1), dim3(64), 0, false, [] { exit_before_barrier(); });
      break;
    case 3:
      run("divergent_shuffle", dim3(1), dim3(64), 0, false, [&] { divergent_shuffle(o); });
      break;
    case 4:
      run("shuffle_mask_without_self", dim3(1), dim3(32), 0, false, [&] { shuffle_mask_without_self(o); });
      break;
    case 5:
      run("shuffle_reads_outside_mask", dim3(1), dim3(32), 0, false, [&] { shuffle_reads_outside_mask(o); });
      break;
    case 6:
      run("dynamic_shared_overflow", dim3(2), dim3(64), 100 * sizeof(float), false, [] { dynamic_shared_overflow(100); });
      break;
    case 7:
      run("grid_deadlock", dim3(2), dim3(32), 0, true, [] { grid_deadlock(&flag); });
      break;
    case 8:
      run("shared_race", dim3(1), dim3(32), 0, false, [&] { shared_race(o); });
      break;
    case 9:
      run("shared_no_race", dim3(1), dim3(32), 0, false, [&] { shared_no_race(o); });
      break;
    default:
      return 1;
  }
  return 0;
}

}  // extern "C"
