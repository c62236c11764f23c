// diversity_select (DivPrune) on CUDA, device code (torch-free). Spec: mrprune.reference.diversity_select;
// launcher and binding: csrc/cuda/diversity_select.cu.
//
// Built on the selection skeleton of kernels/selection.cuh:
//   1. row_norm_kernel<kUnitRow>: u_i = x_i / max(||x_i||, 1e-12) (float32 features), or <kInverseNorm>:
//      r_i = 1 / max(||x_i||, 1e-12) (float16 / bfloat16 features, read natively);
//   2. gram_kernel: S = U U^T in FP32 (float32), or gram_mma_kernel (kernels/gram_mma.cuh): S_ij = (x_i . x_j) r_i r_j
//      on tensor cores from the raw half-precision rows; bitwise symmetric either way (so a column of d = 1 - S is the
//      same as a row, and the exact step-0 tie between two mutual nearest neighbours goes to the lower index, as in
//      the spec);
//   3. first_score_kernel: score_j = the second-smallest value of column j of d (the nearest *other* token; the
//      smallest is the self-distance), read as row j, one warp per token;
//   4. diversity_select_kernel: one block per item runs all k steps: j = argmax score (ties to the lower index),
//      then per step nearest_i = min(nearest_i, 1 - S[j, i]) and the block argmax of nearest (picked tokens at -inf
//      with mask_picked). A step streams one row of S (n floats) and does O(n) work, so a single block per item is
//      the fastest layout (no cross-block exchange on the critical path); the state (nearest, picked) stays in
//      shared memory when it fits, else in a global workspace, and each thread only ever touches its own tokens.
// d = 1 - s is rounded in float32 exactly as the reference computes `1 - x @ x.T`.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "mrprune/kernels/gram_mma.cuh"
#include "mrprune/kernels/selection.cuh"

namespace mrprune::kernels::diversity {

using selection::better;
using selection::Pick;

constexpr int kScoreThreads = 256;
constexpr int kSelectThreads = 1024;

// score[b, j] = second-smallest of {1 - S[b, j, i] : i < n_b} (the smallest itself when n_b == 1), 0 for padding.
// One warp per token j over the flattened [items * N] tokens. The (smallest, second) pairs merge exactly:
// merge((a1, a2), (b1, b2)) = (min(a1, b1), min(max(a1, b1), min(a2, b2))) is the two smallest of the union.
template <int kThreads>
__global__ void __launch_bounds__(kThreads)
    first_score_kernel(const float* __restrict__ sim, const int64_t* __restrict__ lengths, int64_t rows,
                       int n_tokens, float* __restrict__ score) {
  constexpr int kWarps = kThreads / 32;
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (r >= rows) return;  // warp-uniform
  const int64_t b = r / n_tokens;
  const int j = static_cast<int>(r - b * n_tokens);
  const int n = selection::valid_length(lengths, b, n_tokens);
  if (j >= n) {
    if (lane == 0) score[r] = 0.f;
    return;
  }
  const float* row = sim + r * static_cast<int64_t>(n_tokens);  // row j of item b (= column j: S is symmetric)
  float first = selection::positive_infinity(), second = first;
  for (int i = lane; i < n; i += 32) {
    const float d = 1.f - fminf(__ldg(row + i), 1.f);  // a cosine is at most 1 (see the CPU kernel)
    second = fminf(second, fmaxf(first, d));
    first = fminf(first, d);
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float f = __shfl_xor_sync(0xffffffffu, first, offset);
    const float s = __shfl_xor_sync(0xffffffffu, second, offset);
    second = fminf(fmaxf(first, f), fminf(second, s));
    first = fminf(first, f);
  }
  if (lane == 0) score[r] = n > 1 ? second : first;
}

// One block per item (grid = items). sim: [items, N, N]; first: [items, N]; out: [items, k] prefilled with -1.
// State: when state_in_shared, dynamic shared memory holds nearest [N] floats then picked [N] bytes; otherwise the
// workspaces nearest_ws [items, N] and picked_ws [items, N] (zeroing not needed: initialised here).
template <int kThreads>
__global__ void __launch_bounds__(kThreads, 1)
    diversity_select_kernel(const float* __restrict__ sim, const float* __restrict__ first,
                            const int64_t* __restrict__ lengths, int n_tokens, int k, bool mask_picked,
                            bool state_in_shared, float* __restrict__ nearest_ws, uint8_t* __restrict__ picked_ws,
                            int64_t* __restrict__ out) {
  extern __shared__ __align__(16) float smem[];
  __shared__ Pick scratch[kThreads / 32];

  const int tid = static_cast<int>(threadIdx.x);
  const int64_t item = blockIdx.x;
  const int n = selection::valid_length(lengths, item, n_tokens);
  const int m = k < n ? k : n;
  if (m == 0) return;  // block-uniform

  const int64_t row0 = item * n_tokens;
  float* nearest = state_in_shared ? smem : nearest_ws + row0;
  uint8_t* picked = state_in_shared ? reinterpret_cast<uint8_t*>(smem + n_tokens) : picked_ws + row0;
  const float* item_sim = sim + row0 * n_tokens;
  int64_t* item_out = out + item * k;

  // Thread-private state: token i belongs to thread i % kThreads for the whole run (no barrier needed for it).
  Pick best = selection::no_pick();
  for (int i = tid; i < n; i += kThreads) {
    nearest[i] = selection::positive_infinity();
    picked[i] = 0;
    const Pick c{__ldg(first + row0 + i), 0.f, i};
    if (better(c, best)) best = c;
  }
  int j = selection::block_best<kThreads>(best, scratch).index;

  const float minus_inf = selection::negative_infinity();
  for (int t = 0; t < m; ++t) {
    if (tid == 0) item_out[t] = j;
    const float* row = item_sim + static_cast<int64_t>(j) * n_tokens;
    best = selection::no_pick();
    for (int i = tid; i < n; i += kThreads) {
      const float near = fminf(nearest[i], 1.f - fminf(__ldg(row + i), 1.f));
      nearest[i] = near;
      bool is_picked = picked[i] != 0;
      if (i == j) {
        picked[i] = 1;
        is_picked = true;
      }
      const Pick c{(mask_picked && is_picked) ? minus_inf : near, 0.f, i};
      if (better(c, best)) best = c;
    }
    if (t + 1 == m) break;  // block-uniform
    j = selection::block_best<kThreads>(best, scratch).index;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Host-side launch plan, shared by the launcher (csrc/cuda/diversity_select.cu) and the CPU emulation (csrc/emu), so
// an emulated run launches exactly what a GPU run would. Per chunk of items: the cosine Gram of cuda/unit_gram.cuh
// (unit rows or inverse norms, then the FP32 or tensor-core Gram) into sim [chunk, N, N],
// first_score_kernel<kScoreThreads> into first [chunk, N], then diversity_select_kernel<kSelectThreads> on `items`
// blocks with dynamic_bytes of dynamic shared memory (or the global state workspaces [chunk, N] floats and bytes).
// ---------------------------------------------------------------------------------------------------------------

constexpr int64_t kWorkspaceBytes = int64_t{1} << 30;
constexpr int64_t kMaxGridZ = 65535;

// Static shared memory of diversity_select_kernel<kThreads> (what cudaFuncGetAttributes reports as sharedSizeBytes).
template <int kThreads>
constexpr int64_t static_shared_bytes() {
  return static_cast<int64_t>(kThreads / 32 * sizeof(Pick));
}

struct Plan {
  bool state_in_shared;   // nearest / picked in dynamic shared memory (else global workspaces)
  int64_t state_bytes;    // N floats + N bytes
  int64_t dynamic_bytes;  // of diversity_select_kernel
  int64_t chunk;          // items per chunk
  int64_t tiles;          // Gram tiles per side
  bool vec4;              // gram_kernel<true> (the unit workspace is a fresh, aligned allocation)
};

// dynamic_max: the opt-in shared memory per block minus diversity_select_kernel's static shared memory.
inline Plan plan(int64_t batch, int64_t tokens, int64_t dim, int64_t dynamic_max,
                 int64_t workspace_bytes = kWorkspaceBytes) {
  Plan p;
  p.state_bytes = tokens * static_cast<int64_t>(sizeof(float) + 1);
  p.state_in_shared = p.state_bytes <= dynamic_max;
  p.dynamic_bytes = p.state_in_shared ? p.state_bytes : 0;
  const int64_t per_item = tokens * tokens * 4 + tokens * dim * 4 + tokens * 4 + (p.state_in_shared ? 0 : p.state_bytes);
  int64_t chunk = workspace_bytes / (per_item > 1 ? per_item : 1);
  chunk = chunk < kMaxGridZ ? chunk : kMaxGridZ;
  chunk = chunk < batch ? chunk : batch;
  p.chunk = chunk > 1 ? chunk : 1;
  p.tiles = selection::gram_tiles(tokens);
  p.vec4 = dim % 4 == 0;
  return p;
}

}  // namespace mrprune::kernels::diversity
