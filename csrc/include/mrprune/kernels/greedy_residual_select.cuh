// greedy_residual_select on CUDA, device code (torch-free), on the selection skeleton of kernels/selection.cuh.
// Spec: mrprune.reference.greedy_residual_select; launcher and binding: csrc/cuda/greedy_residual_select.cu.
//
// The algorithm is the weighted pivoted partial Cholesky of G = X X^T (research/algorithms.md §4.5), the same
// greedy as the reference's Gram-Schmidt form: with e_i the residual energy of token i (initially ||x_i||^2), g_i the
// gate, and C the [n, rank] factor of the pivots so far (row i = token i's coefficients),
//     pick j = argmax_{i unpicked} g_i e_i (ties to the lower index; the seed first if given),
//     c_i = (G[j, i] - C[j, :] . C[i, :]) / sqrt(e_j),   C[:, rank] = c,   e_i = max(e_i - c_i^2, 0),
//     e_i = 0 when e_i <= tol * ||x_i||^2 (spanned: never a pivot),
// and once no unpicked token scores > 0, the rest are filled by descending gate, then ascending index.
// G[j, :] comes from one of two row sources (the "form", chosen by the launcher):
//   * gram: a precomputed N x N Gram (selection.cuh's gram_kernel, or gram_mma.cuh's for half precision; one launch
//           per chunk of items), read one row per step;
//   * rows: G[j, i] = x_j . x_i computed on the fly, one GEMV over the item's features per step (the cost profile
//           of the reference's basis form, without any N x N memory).
//
// One launch runs all k steps of every item (greedy_select_kernel): a cooperative launch of P persistent blocks
// per item (P = #SMs / items, one 512-thread block per SM), block p owning a contiguous range of columns (tokens,
// at least 16 each). Per step every block updates its own columns (one warp per column: factor dot product, factor
// entry, energy), finds its best candidate, and the item's blocks exchange candidates through a per-item all-gather
// in global memory (Slot, release/acquire; all blocks are co-resident because the launch is cooperative), so every
// block knows the next pivot after one exchange: one inter-block synchronisation per step. The factor lives in
// global memory ([N, ldf] per item, each row written by its owner and read whole, from L2, by everyone when it
// becomes the pivot); each block keeps the leading entries of its own rows in shared memory (up to ~220 KB), so at
// LLaVA sizes (k = 640 of N = 2880, 22 columns per block at batch 1) the own-column factor reads never leave the SM
// and a step reads only the pivot's factor row and Gram row from L2 / HBM. Energies and picked flags of the own
// columns live in small global workspaces touched only by their owner (L1-resident).
//
// Memory per item in flight: the Gram (gram form: N^2 * 4 bytes), the factor (N * min(k, N) * 4 bytes: 7.4 MB at
// k = 640 of 2880, 89 MB at 2731 of 8192), and 5 bytes per token.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "mrprune/kernels/selection.cuh"

namespace mrprune::kernels::greedy {

using selection::better;
using selection::Pick;
using selection::load_four;
using selection::Slot;

// Threads per selection block: one block per SM (large dynamic shared memory), 16 warps with up to 128 registers
// per thread (at 1024 threads the 64-register cap spills in the column loop).
constexpr int kSelectThreads = 512;
// A block owns at least this many columns of its item (fewer and it would mostly wait in the exchange).
constexpr int kMinColumnsPerBlock = 16;

struct Params {
  const void* x;              // [items, N, D] features of the kernel's element type T (rows form: read every step;
                              // gram form: unused)
  const float* gram;          // [items, N, N] Gram (gram form) or nullptr
  const float* initial;       // [items, N] ||x_i||^2
  const float* gate;          // [items, N] or nullptr (all 1)
  const int64_t* seed;        // [items] or nullptr (no seeds)
  const int64_t* lengths;     // [items]
  float* energy;              // [items, N] workspace: running residual energies (owner block only)
  uint8_t* picked;            // [items, N] workspace, zeroed: 1 once picked
  float* factor;              // [items, N, ldf] workspace, zeroed: factor row of every token
  Slot* slots;                // [2, items, blocks_per_item] workspace, zeroed
  int64_t* out_indices;       // [items, k], prefilled with -1
  float* out_energies;        // [items, k], prefilled with 0
  int n_tokens, dim, k;
  int ldf;                    // factor row stride (>= min(k, N), multiple of 4)
  int blocks_per_item;        // P: blocks launched per item (grid = items * P)
  int cache_cols, cache_ld;   // shared-memory factor cache: entries [0, cache_ld) of own local columns < cache_cols
  float tol;                  // exhaustion_tol
  bool vec_x;                 // rows form, float32: rows 16-byte aligned with D % 4 == 0 (float4 loads)
};

// Columns of item with n tokens: parts blocks (<= P) of width columns each, the last one possibly shorter; every
// block below `parts` owns at least one column. The same formula runs on the host (cache sizing).
__host__ __device__ __forceinline__ void partition(int n, int blocks_per_item, int* parts, int* width) {
  int p = (n + kMinColumnsPerBlock - 1) / kMinColumnsPerBlock;
  p = p < blocks_per_item ? p : blocks_per_item;
  p = p < 1 ? 1 : p;
  const int w = (n + p - 1) / p;
  *width = w;
  *parts = w > 0 ? (n + w - 1) / w : 1;
}

// Dynamic shared memory: [ldf] pivot row | [cache_cols * cache_ld] leading factor entries of the own columns.
// Static: the block_best scratch and one fill tile. T: the features' element type (rows form; the gram form reads
// only the Gram and takes T = float).
template <int kThreads, bool kGram, class T = float>
__global__ void __launch_bounds__(kThreads, 1) greedy_select_kernel(const Params p) {
  extern __shared__ __align__(16) float smem[];
  __shared__ Pick scratch[kThreads / 32];
  __shared__ float fill_tile[kThreads];

  const int tid = static_cast<int>(threadIdx.x);
  const int item = static_cast<int>(blockIdx.x) / p.blocks_per_item;
  const int part = static_cast<int>(blockIdx.x) % p.blocks_per_item;
  const int items = static_cast<int>(gridDim.x) / p.blocks_per_item;
  const int n_tokens = p.n_tokens;
  const int n = selection::valid_length(p.lengths, item, n_tokens);
  const int m = p.k < n ? p.k : n;  // picks of this item
  if (m == 0) return;               // item-uniform
  int parts, width;
  partition(n, p.blocks_per_item, &parts, &width);
  if (part >= parts) return;  // item-uniform for the blocks that stay: they all agree on `parts`
  const int c0 = part * width;
  const int c1 = c0 + width < n ? c0 + width : n;
  const int own = c1 - c0;  // >= 1

  const int64_t row0 = static_cast<int64_t>(item) * n_tokens;
  const float* initial = p.initial + row0;
  const float* gate = p.gate != nullptr ? p.gate + row0 : nullptr;
  float* energy = p.energy + row0;
  uint8_t* picked = p.picked + row0;
  const int ldf = p.ldf;
  float* factor = p.factor + row0 * ldf;
  Slot* slots_even = p.slots + static_cast<int64_t>(item) * p.blocks_per_item;
  Slot* slots_odd = p.slots + static_cast<int64_t>(items + item) * p.blocks_per_item;
  int64_t* out_indices = p.out_indices + static_cast<int64_t>(item) * p.k;
  float* out_energies = p.out_energies + static_cast<int64_t>(item) * p.k;

  float* piv = smem;
  float* cache = smem + ldf;
  const int cache_cols = p.cache_ld > 0 ? p.cache_cols : 0;
  const int cache_ld = p.cache_ld;
  for (int q = tid; q < cache_cols * cache_ld; q += kThreads) cache[q] = 0.f;  // entries past the rank read as 0
  for (int i = c0 + tid; i < c1; i += kThreads) energy[i] = __ldg(initial + i);

  // One warp per own column (columns round-robin over the warps). The dot products run over 4-element chunks: lane q
  // takes chunks q, q + 32, ... in order, then a fixed butterfly sums the lanes. This order depends neither on how
  // the columns are split between blocks (the batch size) nor on the features' addresses (misaligned rows take the
  // same chunks with scalar loads), so results are bitwise reproducible across batch compositions and paddings.
  constexpr int kWarps = kThreads / 32;
  const int lane = tid & 31, warp = tid >> 5;
  const bool vec_x = p.vec_x;
  const int dim_chunks = (p.dim + 3) >> 2;

  // Candidate of this block: the best unpicked own column with a positive gated energy.
  auto scan = [&]() {
    Pick best = selection::no_pick();
    for (int i = c0 + tid; i < c1; i += kThreads) {
      if (picked[i]) continue;
      const float e = energy[i];
      const float score = (gate != nullptr ? __ldg(gate + i) : 1.f) * e;
      if (score > 0.f) {
        const Pick c{score, e, i};
        if (better(c, best)) best = c;
      }
    }
    return best;
  };

  __syncthreads();  // energies initialised, cache zeroed

  int t = 0, rank = 0, j = -1;
  float ej = 0.f;
  const int64_t seed = p.seed != nullptr ? p.seed[item] : -1;
  bool greedy = true;
  if (seed >= 0 && seed < n) {
    j = static_cast<int>(seed);
    ej = __ldg(initial + j);
  } else {
    const Pick best = selection::exchange<kThreads>(scan(), slots_even, slots_odd, part, parts, 0, scratch);
    greedy = best.index >= 0;
    j = best.index;
    ej = best.energy;
  }

  while (greedy) {
    // Pick j (energy ej): record it, then explain it away from every own column.
    if (part == 0 && tid == 0) {
      out_indices[t] = j;
      out_energies[t] = ej;
    }
    if (tid == 0 && c0 <= j && j < c1) picked[j] = 1;
    if (ej > 0.f) {
      const int r4 = (rank + 3) & ~3;  // float4 steps; entries [rank, r4) are zero on both sides
      const float* pivot_row = factor + static_cast<int64_t>(j) * ldf;
      for (int q = tid; q < r4; q += kThreads) piv[q] = q < rank ? __ldcg(pivot_row + q) : 0.f;
      __syncthreads();
      const float inv_pivot = 1.f / sqrtf(ej);
      const float4* piv4 = reinterpret_cast<const float4*>(piv);
      const float* gram_row = kGram ? p.gram + (row0 + j) * static_cast<int64_t>(n_tokens) : nullptr;
      const T* x = static_cast<const T*>(p.x);
      const T* xj = kGram ? nullptr : x + (row0 + j) * static_cast<int64_t>(p.dim);
      // Warp-uniform loop (the shuffles below use the full mask).
      for (int l = warp; l < own; l += kWarps) {
        const int i = c0 + l;
        float g_ji = 0.f, e_i = 0.f, e0_i = 0.f;
        if (lane == 0) {  // issue the scalar loads early; they complete during the dot products
          if constexpr (kGram) g_ji = __ldg(gram_row + i);
          e_i = energy[i];
          e0_i = __ldg(initial + i);
        }
        float dot_c = 0.f, dot_x = 0.f;
        int q = lane;
        if (l < cache_cols) {  // leading entries of the own factor row from shared memory
          const int cached4 = (r4 < cache_ld ? r4 : cache_ld) >> 2;
          const float4* row = reinterpret_cast<const float4*>(cache + static_cast<int64_t>(l) * cache_ld);
          for (; q < cached4; q += 32) {
            const float4 a = piv4[q], c = row[q];
            dot_c = fmaf(a.x, c.x, dot_c);
            dot_c = fmaf(a.y, c.y, dot_c);
            dot_c = fmaf(a.z, c.z, dot_c);
            dot_c = fmaf(a.w, c.w, dot_c);
          }
        }
        {  // the rest from global memory (same chunk sequence per lane)
          const float4* row = reinterpret_cast<const float4*>(factor + static_cast<int64_t>(i) * ldf);
#pragma unroll 4
          for (; q < (r4 >> 2); q += 32) {
            const float4 a = piv4[q], c = __ldcg(row + q);
            dot_c = fmaf(a.x, c.x, dot_c);
            dot_c = fmaf(a.y, c.y, dot_c);
            dot_c = fmaf(a.z, c.z, dot_c);
            dot_c = fmaf(a.w, c.w, dot_c);
          }
        }
        if constexpr (!kGram) {  // G[j, i] = x_j . x_i on the fly
          const T* xi = x + (row0 + i) * static_cast<int64_t>(p.dim);
          for (int c4 = lane; c4 < dim_chunks; c4 += 32) {
            const float4 a = load_four(xj, c4, p.dim, vec_x), v = load_four(xi, c4, p.dim, vec_x);
            dot_x = fmaf(a.x, v.x, dot_x);
            dot_x = fmaf(a.y, v.y, dot_x);
            dot_x = fmaf(a.z, v.z, dot_x);
            dot_x = fmaf(a.w, v.w, dot_x);
          }
        }
#pragma unroll
        for (int offset = 16; offset > 0; offset >>= 1) {
          dot_c += __shfl_xor_sync(0xffffffffu, dot_c, offset);
          if constexpr (!kGram) dot_x += __shfl_xor_sync(0xffffffffu, dot_x, offset);
        }
        if (lane == 0) {
          const float g = kGram ? g_ji : dot_x;
          const float c = (g - dot_c) * inv_pivot;
          factor[static_cast<int64_t>(i) * ldf + rank] = c;
          if (l < cache_cols && rank < cache_ld) cache[static_cast<int64_t>(l) * cache_ld + rank] = c;
          float e = fmaxf(e_i - c * c, 0.f);
          if (e <= p.tol * e0_i) e = 0.f;
          energy[i] = e;
        }
      }
      ++rank;
    }
    __syncthreads();  // energies, picked flag and factor entries written; piv free for the next step
    if (++t == m) break;
    const Pick best = selection::exchange<kThreads>(scan(), slots_even, slots_odd, part, parts, t, scratch);
    if (best.index < 0) break;  // every unpicked token scores 0: fill
    j = best.index;
    ej = best.energy;
  }
  if (t == m) return;

  // Fill: the unpicked tokens by descending gate, then ascending index, into slots [t, m). Token i goes to
  // t + #{unpicked l : g_l > g_i or (g_l == g_i and l < i)} (a rank count, as topk_indices). Every block of the item
  // arrives here after the same exchange (or at t = 0 without one), so every picked flag is visible.
  for (int base = c0; base < c1; base += kThreads) {
    const int i = base + tid;
    const bool mine = i < c1 && !picked[i];
    const float gi = mine ? (gate != nullptr ? __ldg(gate + i) : 1.f) : 0.f;
    int before = 0;
    for (int l0 = 0; l0 < n; l0 += kThreads) {
      const int l = l0 + tid;
      // Picked and out-of-range tokens read as -inf: below every gate (gates are >= 0), never counted.
      fill_tile[tid] = (l < n && __ldcg(picked + l) == 0) ? (gate != nullptr ? __ldg(gate + l) : 1.f)
                                                          : selection::negative_infinity();
      __syncthreads();
      if (mine) {
        const int count = n - l0 < kThreads ? n - l0 : kThreads;
        for (int q = 0; q < count; ++q) {
          const float v = fill_tile[q];
          before += (v > gi) || (v == gi && l0 + q < i);
        }
      }
      __syncthreads();
    }
    const int slot = t + before;
    if (mine && slot < m) out_indices[slot] = i;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Host-side launch plan, shared by the launcher (csrc/cuda/greedy_residual_select.cu) and the CPU emulation
// (csrc/emu), so an emulated run launches exactly what a GPU run would.
// ---------------------------------------------------------------------------------------------------------------

// "auto" takes the Gram when it is at most max_gram_bytes and N^2 D / (2 * speedup) < k N D (see the launcher), with
// speedup kGemmSpeedup for the FP32 FFMA Gram and kMmaSpeedup for the tensor-core Gram of half-precision features
// (about 12x the FFMA rate, and a streamed row is half the bytes; derated).
constexpr int64_t kGemmSpeedup = 16;
constexpr int64_t kMmaSpeedup = 128;
constexpr int64_t kMaxGramBytes = int64_t{1} << 30;
// Workspace (Gram + factor + state) per launch; items are processed in chunks below it (at least one item).
constexpr int64_t kWorkspaceBytes = int64_t{1} << 30;

enum class Form { kAuto, kGram, kRows };

// Static shared memory of greedy_select_kernel<kThreads, *> (what cudaFuncGetAttributes reports as sharedSizeBytes).
template <int kThreads>
constexpr int64_t static_shared_bytes() {
  return static_cast<int64_t>(kThreads / 32 * sizeof(Pick) + kThreads * sizeof(float));
}

struct Plan {
  bool use_gram;        // gram form (greedy_select_kernel<*, true> after a gram_kernel launch per chunk)
  int64_t rank_cap;     // min(k, N): factor columns
  int64_t ldf;          // factor row stride (rank_cap rounded up to 4)
  int64_t pivot_bytes;  // dynamic shared memory of the pivot row (must fit: launchers check it)
  int64_t capacity;     // co-resident selection blocks (one per SM)
  int64_t chunk;        // items per launch
  int64_t slot_ints;    // the slots workspace: [2, capacity] Slots (4 ints each)
};

inline int64_t round_up(int64_t a, int64_t m) { return (a + m - 1) / m * m; }

inline bool choose_gram(Form form, int64_t n, int64_t k, bool half, int64_t max_gram_bytes) {
  if (form == Form::kGram) return true;
  if (form == Form::kRows) return false;
  if (n * n * static_cast<int64_t>(sizeof(float)) > max_gram_bytes) return false;
  return n < 2 * (half ? kMmaSpeedup : kGemmSpeedup) * k;
}

// sms: the GPU's multiprocessors (one selection block each); half: float16 / bfloat16 features (tensor-core Gram);
// max_gram_bytes: the largest Gram "auto" takes (the launcher allows a quarter of the free memory, at least
// kMaxGramBytes: at N = 65,536 a 16 GiB Gram built on tensor cores beats re-reading the features every step).
inline Plan plan(int64_t batch, int64_t tokens, int64_t k, Form form, int sms,
                 int64_t workspace_bytes = kWorkspaceBytes, bool half = false,
                 int64_t max_gram_bytes = kMaxGramBytes) {
  Plan p;
  p.rank_cap = k < tokens ? k : tokens;
  p.use_gram = choose_gram(form, tokens, p.rank_cap, half, max_gram_bytes);
  p.ldf = round_up(p.rank_cap, 4);
  p.pivot_bytes = p.ldf * static_cast<int64_t>(sizeof(float));
  p.capacity = sms;
  const int64_t per_item = (p.use_gram ? tokens * tokens * 4 : 0) + tokens * p.ldf * 4 + tokens * 5;
  int64_t chunk = workspace_bytes / (per_item > 1 ? per_item : 1);
  chunk = chunk < p.capacity ? chunk : p.capacity;
  chunk = chunk < batch ? chunk : batch;
  p.chunk = chunk > 1 ? chunk : 1;
  p.slot_ints = 2 * p.capacity * 4;
  return p;
}

struct ChunkPlan {
  int blocks_per_item;    // P (grid = items * P, cooperative)
  int64_t cache_cols;     // shared-memory factor cache: columns ...
  int64_t cache_ld;       // ... and leading entries per column (multiple of 4; 0: no cache)
  int64_t dynamic_bytes;  // pivot row + cache
};

// A chunk of `items` items; dynamic_max: the opt-in shared memory per block minus the kernel's static shared memory.
inline ChunkPlan plan_chunk(const Plan& plan, int n_tokens, int64_t items, int64_t dynamic_max) {
  ChunkPlan c;
  const int64_t per = plan.capacity / items;
  c.blocks_per_item = static_cast<int>(per > 1 ? per : 1);
  // Shared-memory factor cache: the widest block's columns, as many leading entries as fit (multiple of 4).
  int parts = 1, width = 1;
  partition(n_tokens, c.blocks_per_item, &parts, &width);
  c.cache_cols = width > kMinColumnsPerBlock ? width : kMinColumnsPerBlock;
  const int64_t per_col = (dynamic_max - plan.pivot_bytes) / static_cast<int64_t>(sizeof(float)) / c.cache_cols;
  c.cache_ld = per_col / 4 * 4 < plan.ldf ? per_col / 4 * 4 : plan.ldf;
  if (c.cache_ld < 4) c.cache_ld = 0, c.cache_cols = 0;
  c.dynamic_bytes = plan.pivot_bytes + c.cache_cols * c.cache_ld * static_cast<int64_t>(sizeof(float));
  return c;
}

}  // namespace mrprune::kernels::greedy
