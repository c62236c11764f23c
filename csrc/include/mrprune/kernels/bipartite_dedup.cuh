// bipartite_dedup (VisPruner's even/odd de-duplication) on CUDA, device code (torch-free). Spec:
// mrprune.reference.bipartite_dedup; launcher and binding: csrc/cuda/bipartite_dedup.cu.
//
// Built on the selection skeleton of kernels/selection.cuh, like diversity_select:
//   1. row_norm_kernel<kUnitRow>: u_i = x_i / max(||x_i||, 1e-12);
//   2. gram_kernel: S = U U^T in FP32, bitwise symmetric;
//   3. dedup_rounds_kernel: one block per item runs every round. With the current order of the R remaining tokens
//      in one half of a double buffer: (a) every even position e gets score_e = max over the odd positions o of
//      S[order[2e], order[2o + 1]] (one warp per even position, a gathered row of S); (b) the evens are ranked by a
//      stable descending comparison count, rank_e = #{f : s_f > s_e} + #{f < e : s_f == s_e} (the position a stable
//      sort gives, so no sort is needed), and those with rank >= r land at rank - r of the other half, followed by
//      the odd positions in order; r = min(per_round, R - k, #evens). Rounds go on while R > k.
// A maximum is exact whatever the order of its reduction, so the scores are the reference's float32 values up to
// the Gram's rounding. A round costs O(R^2 / 4) gathered reads of S plus O(#evens^2) comparisons from shared memory;
// rounds depend on each other through the order, so one block per item (no cross-block exchange) is the layout, as
// in the Triton kernel. The state (the order's two halves and the scores) stays in shared memory when it fits, else
// in global workspaces.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "mrprune/kernels/block_selection.cuh"
#include "mrprune/kernels/selection.cuh"

namespace mrprune::kernels::dedup {

constexpr int kRoundThreads = 1024;

// One block per item (grid = items). sim: [items, N, N]; out: [items, k] prefilled with -1, k >= 1. State: when
// state_in_shared, dynamic shared memory holds order [2, N] ints then score [N] floats; otherwise the workspaces
// order_ws [items, 2, N] ints and score_ws [items, N] floats (initialised here).
template <int kThreads>
__global__ void __launch_bounds__(kThreads, 1)
    dedup_rounds_kernel(const float* __restrict__ sim, const int64_t* __restrict__ lengths, int n_tokens, int k,
                        int per_round, bool state_in_shared, int* __restrict__ order_ws, float* __restrict__ score_ws,
                        int64_t* __restrict__ out) {
  extern __shared__ __align__(16) float smem[];
  constexpr int kWarps = kThreads / 32;

  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31, warp = tid >> 5;
  const int64_t item = blockIdx.x;
  const int n = selection::valid_length(lengths, item, n_tokens);
  if (n == 0) return;  // block-uniform

  const int64_t row0 = item * n_tokens;
  int* order = state_in_shared ? reinterpret_cast<int*>(smem) : order_ws + 2 * row0;
  float* score = state_in_shared ? smem + 2 * static_cast<int64_t>(n_tokens) : score_ws + row0;
  const float* item_sim = sim + row0 * n_tokens;

  for (int p = tid; p < n; p += kThreads) order[p] = p;  // the input order, in half 0
  __syncthreads();

  int remaining = n, half = 0;
  while (remaining > k) {  // block-uniform
    const int* src = order + half * n_tokens;
    int* dst = order + (1 - half) * n_tokens;
    const int evens = (remaining + 1) / 2, odds = remaining / 2;  // odds >= 1: remaining > k >= 1
    int r = per_round < remaining - k ? per_round : remaining - k;
    r = r < evens ? r : evens;

    // (a) the best match of every even position among the odd positions
    for (int e = warp; e < evens; e += kWarps) {  // warp-uniform
      const float* row = item_sim + static_cast<int64_t>(src[2 * e]) * n_tokens;
      float best = selection::negative_infinity();
      for (int o = lane; o < odds; o += 32) best = fmaxf(best, __ldg(row + src[2 * o + 1]));
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) best = fmaxf(best, __shfl_xor_sync(0xffffffffu, best, offset));
      if (lane == 0) score[e] = best;
    }
    __syncthreads();  // every score is written before any rank reads them

    // (b) stable descending rank of each even position; the survivors go to rank - r, then the odds follow
    for (int e = tid; e < evens; e += kThreads) {
      const float s = score[e];
      int rank = 0;
      for (int f = 0; f < evens; ++f) {
        const float sf = score[f];
        rank += (sf > s || (sf == s && f < e)) ? 1 : 0;
      }
      if (rank >= r) dst[rank - r] = src[2 * e];
    }
    for (int o = tid; o < odds; o += kThreads) dst[evens - r + o] = src[2 * o + 1];
    __syncthreads();  // the next order is complete (and the scores free) before the next round

    remaining -= r;
    half = 1 - half;
  }

  const int* final_order = order + half * n_tokens;
  const int count = remaining < k ? remaining : k;
  int64_t* item_out = out + item * k;
  for (int p = tid; p < count; p += kThreads) item_out[p] = final_order[p];
}

// ---------------------------------------------------------------------------------------------------------------
// Host-side launch plan, shared by the launcher (csrc/cuda/bipartite_dedup.cu) and the CPU emulation (csrc/emu), so
// an emulated run launches exactly what a GPU run would. Per chunk of items: row_norm_kernel<kNormThreads, kUnitRow>
// into unit [chunk, N, D], gram_kernel<dim % 4 == 0> over (tiles, tiles, items) into sim [chunk, N, N], then
// dedup_rounds_kernel<kRoundThreads> on `items` blocks with dynamic_bytes of dynamic shared memory (or the global
// state workspaces order [chunk, 2, N] ints and score [chunk, N] floats).
// ---------------------------------------------------------------------------------------------------------------

// Static shared memory of dedup_rounds_kernel (none: the state is all dynamic).
template <int kThreads>
constexpr int64_t static_shared_bytes() {
  return 0;
}

using Plan = selection::BlockPlan;

// dynamic_max: the opt-in shared memory per block minus dedup_rounds_kernel's static shared memory. State: the
// order's two halves (ints) and the score (a float) per token.
inline Plan plan(int64_t batch, int64_t tokens, int64_t dim, int64_t dynamic_max,
                 int64_t workspace_bytes = selection::kBlockWorkspaceBytes) {
  return selection::block_plan(batch, tokens, dim, 2 * sizeof(int) + sizeof(float), 0, dynamic_max, workspace_bytes);
}

}  // namespace mrprune::kernels::dedup
