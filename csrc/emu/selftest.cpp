// Small kernels that check the emulator itself (tests/test_cuda_emulation.py): the semantics of its warp
// collectives and barriers, and that each class of GPU bug it claims to detect ends the run with a diagnosis; the
// half-precision conversions (emu_convert_16bit) and WMMA GEMMs checked against a double-precision reference.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <vector>

#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "cuda_runtime.h"
#include "mma.h"

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

// --- WMMA ------------------------------------------------------------------------------------------------------------

namespace wmma = nvcuda::wmma;

// C = A B on 16 x 16 x 16 tiles, the pattern of kernels/gram_mma.cuh: A (32 x 32, row-major) and B given as its
// transpose Bt (32 x 32 row-major, i.e. B column-major) staged through shared memory in k-steps of 16 by both warps;
// warp w owns output tiles w and w + 2 (2 x 2 tiles); the epilogue halves the accumulator element-wise (exact),
// stages it through shared memory and every lane writes elements that another lane stored (__syncwarp in between).
template <class T>
__global__ void wmma_gemm_shared(const T* a, const T* bt, float* c) {
  constexpr int kN = 32, kLd = 16 + 8, kStageLd = 20;
  __shared__ __align__(32) T sa[kN * kLd];
  __shared__ __align__(32) T sb[kN * kLd];
  __shared__ __align__(32) float stage[2][16 * kStageLd];
  const int t = static_cast<int>(threadIdx.x), warp = t >> 5, lane = t & 31;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
  for (int i = 0; i < 2; ++i) wmma::fill_fragment(acc[i], 0.f);
  for (int k0 = 0; k0 < kN; k0 += 16) {
    for (int e = t; e < kN * 16; e += 64) {  // 32 rows x 16 columns of each operand
      const int r = e / 16, col = e % 16;
      sa[r * kLd + col] = a[r * kN + k0 + col];
      sb[r * kLd + col] = bt[r * kN + k0 + col];
    }
    __syncthreads();
    for (int i = 0; i < 2; ++i) {
      const int tile = warp + 2 * i, tm = tile / 2, tn = tile % 2;
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
      wmma::load_matrix_sync(fa, sa + tm * 16 * kLd, kLd);
      wmma::load_matrix_sync(fb, sb + tn * 16 * kLd, kLd);
      wmma::mma_sync(acc[i], fa, fb, acc[i]);
    }
    __syncthreads();
  }
  for (int i = 0; i < 2; ++i) {
    const int tile = warp + 2 * i, tm = tile / 2, tn = tile % 2;
    for (int e = 0; e < acc[i].num_elements; ++e) acc[i].x[e] *= 0.5f;
    wmma::store_matrix_sync(stage[warp], acc[i], kStageLd, wmma::mem_row_major);
    __syncwarp();
    for (int e = lane; e < 256; e += 32) {
      const int q = (e + 1) % 256, r = q / 16, col = q % 16;  // stored by lane (lane + 1) % 32
      c[(tm * 16 + r) * kN + tn * 16 + col] = 2.f * stage[warp][r * kStageLd + col];
    }
    __syncwarp();  // the stage is rewritten by the next tile
  }
  if (lane < 16) __syncwarp(0x0000ffffu);  // a partial mask: only the named lanes meet (the others exit)
}

// C = A B + C straight from global memory, A, B and C in the given layouts (column-major A: element (i, k) at
// a[k * lda + i]; column-major B: (k, j) at b[j * ldb + k]; column-major C: (i, j) at c[j * ldc + i]); the warps take
// the output tiles in turn and load the accumulator from C.
template <class T, class LayoutA, class LayoutB>
__global__ void wmma_gemm_global(const T* a, unsigned lda, const T* b, unsigned ldb, float* c, unsigned ldc,
                                 wmma::layout_t c_layout, int m, int n, int k) {
  constexpr bool a_col = std::is_same_v<LayoutA, wmma::col_major>, b_col = std::is_same_v<LayoutB, wmma::col_major>;
  const bool c_col = c_layout == wmma::mem_col_major;
  const int warp = static_cast<int>(threadIdx.x) >> 5, warps = static_cast<int>(blockDim.x) >> 5;
  for (int tile = warp; tile < (m / 16) * (n / 16); tile += warps) {
    const int i0 = tile / (n / 16) * 16, j0 = tile % (n / 16) * 16;
    float* c_tile = c + (c_col ? j0 * ldc + i0 : i0 * ldc + j0);
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::load_matrix_sync(acc, c_tile, ldc, c_layout);
    for (int k0 = 0; k0 < k; k0 += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, LayoutA> fa;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LayoutB> fb;
      wmma::load_matrix_sync(fa, a + (a_col ? k0 * lda + i0 : i0 * lda + k0), lda);
      wmma::load_matrix_sync(fb, b + (b_col ? j0 * ldb + k0 : k0 * ldb + j0), ldb);
      wmma::mma_sync(acc, fa, fb, acc);
    }
    wmma::store_matrix_sync(c_tile, acc, ldc, c_layout);
  }
}

// The detected misuses (one warp each).
__global__ void wmma_load_half_warp() {
  __shared__ __align__(32) __half tile[256];
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  if ((threadIdx.x & 31) < 16) wmma::load_matrix_sync(fa, tile, 16);
}

__global__ void wmma_mma_half_warp(float* out) {
  __shared__ __align__(32) __nv_bfloat16 tile[256];
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 0.f);
  wmma::load_matrix_sync(fa, tile, 16);
  wmma::load_matrix_sync(fb, tile, 16);
  if ((threadIdx.x & 31) < 16) wmma::mma_sync(acc, fa, fb, acc);
  __syncwarp();
  out[threadIdx.x] = acc.x[0];
}

__global__ void wmma_different_pointers() {
  __shared__ __align__(32) __half tile[512];
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  wmma::load_matrix_sync(fa, tile + (threadIdx.x & 1) * 16, 16);  // 32-byte aligned, but lane-dependent
}

__global__ void wmma_ldm_not_multiple() {
  __shared__ __align__(32) __half tile[512];
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  wmma::load_matrix_sync(fa, tile, 12);
}

__global__ void wmma_misaligned_pointer() {
  __shared__ __align__(32) __nv_bfloat16 tile[512];
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> fb;
  wmma::load_matrix_sync(fb, tile + 8, 16);  // 16 bytes past a 32-byte boundary
}

__global__ void wmma_store_ldm_not_multiple() {
  __shared__ __align__(32) float tile[16 * 18];
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 1.f);
  wmma::store_matrix_sync(tile, acc, 18, wmma::mem_row_major);
}

__global__ void wmma_lane_dependent_fragment() {
  __shared__ __align__(32) float tile[256];
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 0.f);
  acc.x[0] = static_cast<float>(threadIdx.x);  // relies on the hardware's element-to-lane mapping
  wmma::store_matrix_sync(tile, acc, 16, wmma::mem_row_major);
}

// Each lane writes 8 elements of the tile, then the warp loads it without a __syncwarp in between.
__global__ void wmma_load_without_syncwarp() {
  __shared__ __align__(32) __half tile[256];
  const int lane = static_cast<int>(threadIdx.x & 31);
  for (int e = lane; e < 256; e += 32) tile[e] = __float2half_rn(static_cast<float>(e + 1));
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  wmma::load_matrix_sync(fa, tile, 16);
}

__global__ void syncwarp_half_warp() {
  if ((threadIdx.x & 31) < 16) __syncwarp();
}

// 64-byte aligned host arrays (WMMA pointers must be 32-byte aligned).
template <class T>
std::unique_ptr<T[], void (*)(void*)> aligned_array(size_t n) {
  const size_t bytes = (n * sizeof(T) + 63) / 64 * 64;
  T* p = static_cast<T*>(std::aligned_alloc(64, bytes));
  for (size_t i = 0; i < n; ++i) p[i] = T();
  return {p, std::free};
}

// Deterministic test values: small integers (every sum exact in float, whatever the order) or uniform in [-1, 1).
struct Values {
  uint64_t state;
  bool integers;
  float next() {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    const uint32_t r = static_cast<uint32_t>(state >> 33);
    return integers ? static_cast<float>(static_cast<int>(r % 9) - 4) : static_cast<float>(r) * 0x1p-30f - 1.f;
  }
};

template <class T>
T to_16bit(float v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(v);
  } else {
    return __float2bfloat16_rn(v);
  }
}

// One GEMM: runs it, compares every element of C with the double-precision product of the (rounded) inputs: exactly
// for integer inputs, within float accumulation error otherwise; and bitwise with the emulator's documented order (k
// ascending from c, one fma per step). Writes {elements checked, mismatches} to out[0..1].
template <class T>
void check_gemm(int variant, uint64_t seed, int* out) {
  const bool integers = variant == 0 || variant == 3;
  const bool shared = variant < 2;
  const int m = 32, n = shared ? 32 : 48, k = shared ? 32 : 64;
  // variant 2: A column-major, B row-major, C column-major; variant 3: A row-major, B column-major, C row-major.
  const bool a_col = variant == 2, b_col = variant != 2, c_col = variant == 2;
  const unsigned lda = shared ? k : (a_col ? m + 8 : k + 8), ldb = shared ? k : (b_col ? k + 8 : n + 8);
  const unsigned ldc = shared ? n : (c_col ? m + 4 : n + 4);
  auto a = aligned_array<T>(static_cast<size_t>(lda) * (a_col ? k : m));
  auto b = aligned_array<T>(static_cast<size_t>(ldb) * (b_col ? n : k));
  auto c = aligned_array<float>(static_cast<size_t>(ldc) * (c_col ? n : m));
  std::vector<double> av(static_cast<size_t>(m * k)), bv(static_cast<size_t>(k * n)), cv(static_cast<size_t>(m * n));
  Values values{seed, integers};
  for (int i = 0; i < m; ++i) {
    for (int q = 0; q < k; ++q) {
      const T v = to_16bit<T>(values.next());
      a[a_col ? q * lda + i : i * lda + q] = v;
      av[static_cast<size_t>(i * k + q)] = static_cast<float>(v);
    }
  }
  for (int q = 0; q < k; ++q) {
    for (int j = 0; j < n; ++j) {
      const T v = to_16bit<T>(values.next());
      b[b_col ? j * ldb + q : q * ldb + j] = v;
      bv[static_cast<size_t>(q * n + j)] = static_cast<float>(v);
    }
  }
  const auto c_at = [&](int i, int j) -> float& { return c[c_col ? j * ldc + i : i * ldc + j]; };
  for (int i = 0; i < m; ++i) {
    for (int j = 0; j < n; ++j) {
      const float v = shared ? 0.f : values.next();  // the shared kernel computes C = A B
      c_at(i, j) = v;
      cv[static_cast<size_t>(i * n + j)] = v;
    }
  }
  if (variant < 2) {
    run("wmma_gemm_shared", dim3(1), dim3(64), 0, false, [&] { wmma_gemm_shared<T>(a.get(), b.get(), c.get()); });
  } else if (variant == 2) {
    run("wmma_gemm_global", dim3(1), dim3(64), 0, false, [&] {
      wmma_gemm_global<T, wmma::col_major, wmma::row_major>(a.get(), lda, b.get(), ldb, c.get(), ldc,
                                                             wmma::mem_col_major, m, n, k);
    });
  } else {
    run("wmma_gemm_global", dim3(1), dim3(64), 0, false, [&] {
      wmma_gemm_global<T, wmma::row_major, wmma::col_major>(a.get(), lda, b.get(), ldb, c.get(), ldc,
                                                             wmma::mem_row_major, m, n, k);
    });
  }
  int mismatches = 0;
  for (int i = 0; i < m; ++i) {
    for (int j = 0; j < n; ++j) {
      double exact = cv[static_cast<size_t>(i * n + j)], magnitude = std::fabs(exact);
      float sequential = static_cast<float>(exact);
      for (int q = 0; q < k; ++q) {
        const double p = av[static_cast<size_t>(i * k + q)] * bv[static_cast<size_t>(q * n + j)];
        exact += p;
        magnitude += std::fabs(p);
        sequential = std::fma(static_cast<float>(av[static_cast<size_t>(i * k + q)]),
                              static_cast<float>(bv[static_cast<size_t>(q * n + j)]), sequential);
      }
      const float got = c_at(i, j);
      const bool close = integers ? got == exact : std::fabs(got - exact) <= 1e-5 * magnitude + 1e-30;
      if (!close || got != sequential) ++mismatches;
    }
  }
  out[0] = m * n;
  out[1] = mismatches;
}

}  // namespace

extern "C" {

// Converts n values through the emulated conversions: kind 0 __half bits (uint16) -> float, 1 __nv_bfloat16 bits ->
// float, 2 float -> __half bits (__float2half_rn), 3 float -> __nv_bfloat16 bits (__float2bfloat16_rn). Returns 0, or
// 1 for an unknown kind.
int emu_convert_16bit(int kind, const void* in, void* out, int64_t n) {
  const auto* bits = static_cast<const uint16_t*>(in);
  const auto* floats = static_cast<const float*>(in);
  for (int64_t i = 0; i < n; ++i) {
    switch (kind) {
      case 0:
        static_cast<float*>(out)[i] = __half2float(__ushort_as_half(bits[i]));
        break;
      case 1:
        static_cast<float*>(out)[i] = __bfloat162float(__ushort_as_bfloat16(bits[i]));
        break;
      case 2:
        static_cast<uint16_t*>(out)[i] = __half_as_ushort(__float2half_rn(floats[i]));
        break;
      case 3:
        static_cast<uint16_t*>(out)[i] = __bfloat16_as_ushort(__float2bfloat16_rn(floats[i]));
        break;
      default:
        return 1;
    }
  }
  return 0;
}

// Runs self-test `which`; out receives 64 * 5 ints for "semantics", 8 for the WMMA GEMMs. Returns 0 (errors end the
// process), 1 for an unknown test.
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
    case 10:  // WMMA GEMMs of bf16 (10) and fp16 (11) inputs: out[2 v], out[2 v + 1] = checked, mismatches of variant v
    case 11:
      for (int variant = 0; variant < 4; ++variant) {
        if (which == 10) {
          check_gemm<__nv_bfloat16>(variant, 11 + static_cast<uint64_t>(variant), o + 2 * variant);
        } else {
          check_gemm<__half>(variant, 23 + static_cast<uint64_t>(variant), o + 2 * variant);
        }
      }
      break;
    case 12:
      run("wmma_load_half_warp", dim3(1), dim3(32), 0, false, [] { wmma_load_half_warp(); });
      break;
    case 13: {
      std::vector<float> sink(32);
      run("wmma_mma_half_warp", dim3(1), dim3(32), 0, false, [&] { wmma_mma_half_warp(sink.data()); });
      break;
    }
    case 14:
      run("wmma_different_pointers", dim3(1), dim3(32), 0, false, [] { wmma_different_pointers(); });
      break;
    case 15:
      run("wmma_ldm_not_multiple", dim3(1), dim3(32), 0, false, [] { wmma_ldm_not_multiple(); });
      break;
    case 16:
      run("wmma_misaligned_pointer", dim3(1), dim3(32), 0, false, [] { wmma_misaligned_pointer(); });
      break;
    case 17:
      run("wmma_store_ldm_not_multiple", dim3(1), dim3(32), 0, false, [] { wmma_store_ldm_not_multiple(); });
      break;
    case 18:
      run("wmma_lane_dependent_fragment", dim3(1), dim3(32), 0, false, [] { wmma_lane_dependent_fragment(); });
      break;
    case 19:
      run("wmma_load_without_syncwarp", dim3(1), dim3(32), 0, false, [] { wmma_load_without_syncwarp(); });
      break;
    case 20:
      run("syncwarp_half_warp", dim3(1), dim3(32), 0, false, [] { syncwarp_half_warp(); });
      break;
    default:
      return 1;
  }
  return 0;
}

}  // extern "C"
