// coverage_select (SCOPE) on CUDA, device code (torch-free). Spec: mrprune.reference.coverage_select; launcher
// and binding: csrc/cuda/coverage_select.cu.
//
// Built on the selection skeleton of kernels/selection.cuh, like diversity_select:
//   1. row_norm_kernel<kSquaredNorm>: ||x_i||^2, for the spec's diagonal rule (S_ii = 1 exactly for a token
//      with ||x_i|| >= 1e-12, so that exact ties stay exact);
//   2. row_norm_kernel<kUnitRow>: u_i = x_i / max(||x_i||, 1e-12);
//   3. gram_kernel: S = U U^T in FP32, bitwise symmetric (a column of S is the same as a row);
//   4. coverage_select_kernel: one block per item runs all k steps. Step t computes, for every unpicked column j,
//      gain_j = sum_i max(0, S_ij - cur_i) over the item's valid tokens (picked ones and j itself included), takes
//      j* = argmax gain_j * a_j^alpha (ties to the lower index), then cur_i := max(cur_i, S_j*i).
// A step reads the whole n x n block of S once (O(n^2) work, no cross-block exchange on its critical path): one
// block per item is the layout without inter-block synchronisation, as the Triton kernel. The state (cur, the
// weights a^alpha, the picked flags) stays in shared memory when it fits, else in global workspaces; `cur` is read
// by every thread and rewritten between two barriers, the weights and flags only by the owner of the column.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "mrprune/kernels/block_selection.cuh"
#include "mrprune/kernels/selection.cuh"

namespace mrprune::kernels::coverage {

using selection::better;
using selection::Pick;

constexpr int kSelectThreads = 1024;

// a^alpha with the spec's special cases exact: alpha = 1 is a itself, alpha = 0 is 1 (0^0 = 1, as torch's pow).
__device__ __forceinline__ float weight_of(float a, float alpha) {
  if (alpha == 1.f) return a;
  if (alpha == 0.f) return 1.f;
  return powf(a, alpha);
}

// S_ii as the spec defines it: exactly 1 for a token whose norm is at least 1e-12 (the computed u_i . u_i is 1 up to
// rounding), the computed value otherwise (0 for a zero token). norm2: ||x_i||^2 from row_norm_kernel<kSquaredNorm>,
// the same float32 sum row_norm_kernel<kUnitRow> / <kInverseNorm> normalised with.
__device__ __forceinline__ float self_similarity(float computed, float norm2) {
  return sqrtf(norm2) >= 1e-12f ? 1.f : computed;
}

// One block per item (grid = items). sim: [items, N, N]; norm2: [items, N]; saliency: [items, N] or null (a = 1);
// out: [items, k] prefilled with -1. State: when state_in_shared, dynamic shared memory holds cur [N] floats,
// weight [N] floats, then picked [N] bytes; otherwise the workspaces cur_ws, weight_ws [items, N] floats and
// picked_ws [items, N] bytes (initialised here).
template <int kThreads>
__global__ void __launch_bounds__(kThreads, 1)
    coverage_select_kernel(const float* __restrict__ sim, const float* __restrict__ norm2,
                           const float* __restrict__ saliency, float alpha, const int64_t* __restrict__ lengths,
                           int n_tokens, int k, bool state_in_shared, float* __restrict__ cur_ws,
                           float* __restrict__ weight_ws, uint8_t* __restrict__ picked_ws, int64_t* __restrict__ out) {
  extern __shared__ __align__(16) float smem[];
  __shared__ Pick scratch[kThreads / 32];

  const int tid = static_cast<int>(threadIdx.x);
  const int64_t item = blockIdx.x;
  const int n = selection::valid_length(lengths, item, n_tokens);
  const int m = k < n ? k : n;
  if (m == 0) return;  // block-uniform

  const int64_t row0 = item * n_tokens;
  float* cur = state_in_shared ? smem : cur_ws + row0;
  float* weight = state_in_shared ? smem + n_tokens : weight_ws + row0;
  uint8_t* picked = state_in_shared ? reinterpret_cast<uint8_t*>(smem + 2 * static_cast<int64_t>(n_tokens))
                                    : picked_ws + row0;
  const float* item_sim = sim + row0 * n_tokens;
  int64_t* item_out = out + item * k;

  // weight[j] and picked[j] belong to thread j % kThreads for the whole run; cur is shared by all.
  for (int i = tid; i < n; i += kThreads) {
    cur[i] = 0.f;
    picked[i] = 0;
    weight[i] = saliency != nullptr ? weight_of(__ldg(saliency + row0 + i), alpha) : 1.f;
  }
  __syncthreads();  // every thread reads all of cur below

  for (int t = 0; t < m; ++t) {
    Pick best = selection::no_pick();
    for (int j = tid; j < n; j += kThreads) {
      if (picked[j] != 0) continue;
      // column j of S (= row j: S is bitwise symmetric), read row by row: the warp's lanes read consecutive columns
      const float* col = item_sim + j;
      float gain = 0.f;
#pragma unroll 4
      for (int i = 0; i < n; ++i) {
        float s = __ldg(col + static_cast<int64_t>(i) * n_tokens);
        if (i == j) s = self_similarity(s, __ldg(norm2 + row0 + j));
        gain += fmaxf(s - cur[i], 0.f);
      }
      const Pick c{gain * weight[j], 0.f, j};
      if (better(c, best)) best = c;
    }
    // Ends with a barrier: every thread has finished reading cur for this step before anyone raises it below.
    const int j = selection::block_best<kThreads>(best, scratch).index;
    if (tid == 0) item_out[t] = j;
    if (j % kThreads == tid) picked[j] = 1;  // its owner: the only thread that reads the flag
    if (t + 1 == m) break;                   // block-uniform
    const float* row = item_sim + static_cast<int64_t>(j) * n_tokens;
    for (int i = tid; i < n; i += kThreads) {
      float s = __ldg(row + i);
      if (i == j) s = self_similarity(s, __ldg(norm2 + row0 + j));
      cur[i] = fmaxf(cur[i], s);
    }
    __syncthreads();  // the raised cover is complete before the next step reads it
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Host-side launch plan, shared by the launcher (csrc/cuda/coverage_select.cu) and the CPU emulation (csrc/emu), so
// an emulated run launches exactly what a GPU run would. Per chunk of items: row_norm_kernel<kSquaredNorm> into norm2
// [chunk, N], the cosine Gram of cuda/unit_gram.cuh (unit rows or inverse norms, then the FP32 or tensor-core Gram)
// into sim [chunk, N, N], then coverage_select_kernel<kSelectThreads> on `items` blocks with
// dynamic_bytes of dynamic shared memory (or the global state workspaces [chunk, N]: two of floats, one of bytes).
// ---------------------------------------------------------------------------------------------------------------

// Static shared memory of coverage_select_kernel<kThreads> (what cudaFuncGetAttributes reports as sharedSizeBytes).
template <int kThreads>
constexpr int64_t static_shared_bytes() {
  return static_cast<int64_t>(kThreads / 32 * sizeof(Pick));
}

using Plan = selection::BlockPlan;

// dynamic_max: the opt-in shared memory per block minus coverage_select_kernel's static shared memory. State: cur and
// weight (floats) and picked (a byte) per token; the squared norms (4 bytes per token) are one more workspace.
inline Plan plan(int64_t batch, int64_t tokens, int64_t dim, int64_t dynamic_max,
                 int64_t workspace_bytes = selection::kBlockWorkspaceBytes) {
  return selection::block_plan(batch, tokens, dim, 2 * sizeof(float) + 1, sizeof(float), dynamic_max,
                               workspace_bytes);
}

}  // namespace mrprune::kernels::coverage
