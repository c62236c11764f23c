// topk_indices on CUDA, device code (torch-free): a deterministic top-k by rank counting.
// Spec: mrprune.reference.topk_indices; launcher and binding: csrc/cuda/topk_indices.cu.
//
// For item b with n = lengths[b] valid tokens, token i < n has
//     rank_i = #{ j < n : s_j > s_i  or  (s_j == s_i and j < i) },
// its position in the total order "larger score first, ties to the lower index". Ranks are a permutation of
// [0, n), so every token with rank_i < k writes i to out[b, rank_i] and the score-ordered result needs no sort.
// With sort_indices, token i is kept iff rank_i < k and goes to position #{ j < i : rank_j < k }: a keep flag per
// token, a kept count per tile, then a prefix count (kernel topk_compact_kernel).
//
// Why rank counting rather than a sort or a radix select:
//   * exact and deterministic: the tie rule is part of the comparison, so the result never depends on thread
//     scheduling, atomics or on a library sort being stable; it matches the reference bit for bit (-0.0 == +0.0,
//     +-inf compare as usual; NaN is rejected by the Python validation);
//   * no sort library (no CUB/thrust temporary storage, nothing torch-specific), so this file compiles with plain
//     nvcc and stays small;
//   * the O(n^2) work is cheap at the sizes that matter: n = 2304 visual tokens is ~5.3M comparisons per item,
//     a few microseconds on an H100 (each thread streams the item's scores once, from shared memory, four per
//     128-bit broadcast load). For n above ~64k tokens the quadratic cost starts to dominate and a radix select
//     (histogram passes over the float bit patterns, then a tie-aware compaction) would be the next step.
//
// Layout: scores [B, N] float32 contiguous, lengths [B] int64, out [B, k] int64 contiguous; grid (ceil(N / kBlock),
// B) with kBlock threads per block, one thread per token i. Offsets b * N + i are computed in int64. The host caps
// gridDim.y (65535) by launching the batch in chunks with offset pointers.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace mrprune::kernels::topk {

// Threads per block (tokens per tile) used by the launcher; a multiple of 32 (warp ballots) and of 4 (float4 reads).
constexpr int kDefaultBlock = 256;
// gridDim.y limit: the launcher runs the batch in chunks of at most this many items.
constexpr int64_t kMaxGridY = 65535;

// Host-side launch plan, shared by the launcher (csrc/cuda/topk_indices.cu) and the CPU emulation (csrc/emu), so an
// emulated run launches exactly what a GPU run would. Per chunk of `chunk` items starting at item b0: grid (tiles,
// min(chunk, batch - b0)) of kDefaultBlock threads; with sort_indices, the rank kernel then the compaction kernel,
// communicating through keep [batch, N] bytes and tile_kept [batch, tiles] ints (offset by the chunk's first item).
struct LaunchPlan {
  int64_t tiles;  // blocks per item (gridDim.x)
  int64_t chunk;  // items per launch (gridDim.y)
};

inline LaunchPlan plan_launch(int64_t batch, int64_t tokens, int64_t max_grid_y = kMaxGridY) {
  LaunchPlan plan;
  plan.tiles = (tokens + kDefaultBlock - 1) / kDefaultBlock;
  plan.chunk = batch < max_grid_y ? batch : max_grid_y;
  return plan;
}

__device__ __forceinline__ float negative_infinity() { return __int_as_float(static_cast<int>(0xff800000u)); }

// lengths[b] clamped to [0, n_tokens] (the Python router validates it; the clamp keeps a bad length in bounds).
__device__ __forceinline__ int valid_length(const int64_t* lengths, int64_t b, int n_tokens) {
  const int64_t n = lengths[b];
  return n < 0 ? 0 : (n > n_tokens ? n_tokens : static_cast<int>(n));
}

// Kernel 1: the rank of every valid token, tiled through shared memory.
//
// Block x of item b owns tokens i in [x * kBlock, (x + 1) * kBlock). It walks j over [0, n) in tiles of kBlock
// scores (one coalesced load per thread, then every thread reads the whole tile as float4 broadcasts). Tiles are
// aligned with the blocks, so a tile lies entirely below the block's tokens (a tie counts: s_j >= s_i), entirely
// above them (s_j > s_i), or is the block's own tile (the full rule with the index comparison); only the last tile
// can be partial, and it is padded with -inf, which never counts (padding sits at j >= n > i).
//
// kSorted = false: writes out[b, rank_i] = i for rank_i < k.
// kSorted = true:  writes keep[b, i] = (i < n and rank_i < k) for every i < N of the block, and
//                  tile_kept[b, x] = the number of kept tokens of the block (consumed by topk_compact_kernel).
// Both: out[b, min(k, n):k] = -1 (grid-strided over the blocks of the item).
template <int kBlock, bool kSorted>
__global__ void __launch_bounds__(kBlock)
    topk_rank_kernel(const float* __restrict__ scores, const int64_t* __restrict__ lengths, int n_tokens, int k,
                     int64_t* __restrict__ out, uint8_t* __restrict__ keep, int* __restrict__ tile_kept) {
  static_assert(kBlock % 32 == 0 && kBlock >= 32 && kBlock <= 1024, "kBlock must be a multiple of 32 in [32, 1024]");
  __shared__ __align__(16) float tile[kBlock];

  const int64_t b = blockIdx.y;
  const int tid = static_cast<int>(threadIdx.x);
  const int i0 = static_cast<int>(blockIdx.x) * kBlock;
  const int i = i0 + tid;
  const int n = valid_length(lengths, b, n_tokens);
  const int take = k < n ? k : n;
  const int64_t row = b * static_cast<int64_t>(n_tokens);
  int64_t* out_row = out + b * static_cast<int64_t>(k);

  // Slots past the item's tokens.
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kBlock;
  for (int64_t p = take + static_cast<int64_t>(i); p < k; p += stride) out_row[p] = -1;

  if (i0 >= n) return;  // block-uniform: no valid token here (and none of its flags is ever read)

  const bool valid = i < n;
  const float si = valid ? scores[row + i] : 0.f;
  const float4* tile4 = reinterpret_cast<const float4*>(tile);
  int rank = 0;
  for (int j0 = 0; j0 < n; j0 += kBlock) {
    const int j = j0 + tid;
    tile[tid] = j < n ? scores[row + j] : negative_infinity();
    __syncthreads();
    if (j0 < i0) {  // every j of the tile is below every i of the block (and the tile is full)
#pragma unroll 8
      for (int q = 0; q < kBlock / 4; ++q) {
        const float4 v = tile4[q];
        rank += (v.x >= si) + (v.y >= si) + (v.z >= si) + (v.w >= si);
      }
    } else if (j0 > i0) {  // every j is above every i
#pragma unroll 8
      for (int q = 0; q < kBlock / 4; ++q) {
        const float4 v = tile4[q];
        rank += (v.x > si) + (v.y > si) + (v.z > si) + (v.w > si);
      }
    } else {  // the block's own tile: local index c against tid
#pragma unroll 4
      for (int q = 0; q < kBlock / 4; ++q) {
        const float4 v = tile4[q];
        const int c = 4 * q;
        rank += (v.x > si || (v.x == si && c < tid)) + (v.y > si || (v.y == si && c + 1 < tid)) +
                (v.z > si || (v.z == si && c + 2 < tid)) + (v.w > si || (v.w == si && c + 3 < tid));
      }
    }
    __syncthreads();  // the tile is overwritten by the next iteration
  }

  const bool kept = valid && rank < k;
  if constexpr (kSorted) {
    if (i < n_tokens) keep[row + i] = kept ? 1 : 0;
    const int count = __syncthreads_count(kept);
    if (tid == 0) tile_kept[b * gridDim.x + blockIdx.x] = count;
  } else {
    if (kept) out_row[rank] = i;
  }
}

// Kernel 2 (sort_indices only), same grid as kernel 1: out[b, base + #{kept j < i in the tile}] = i for every kept
// token i, where base = the kept count of the item's earlier tiles (sum of tile_kept[b, :x]). Integer sums and
// warp ballots: exact and order-independent.
template <int kBlock>
__global__ void __launch_bounds__(kBlock)
    topk_compact_kernel(const int64_t* __restrict__ lengths, int n_tokens, int k, const uint8_t* __restrict__ keep,
                        const int* __restrict__ tile_kept, int64_t* __restrict__ out) {
  static_assert(kBlock % 32 == 0 && kBlock >= 32 && kBlock <= 1024, "kBlock must be a multiple of 32 in [32, 1024]");
  constexpr int kWarps = kBlock / 32;
  __shared__ int partial[kWarps];
  __shared__ int warp_kept[kWarps];

  const int64_t b = blockIdx.y;
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31, warp = tid >> 5;
  const int i0 = static_cast<int>(blockIdx.x) * kBlock;
  const int i = i0 + tid;
  const int n = valid_length(lengths, b, n_tokens);
  if (i0 >= n) return;  // block-uniform

  // base: kept tokens in the tiles before this one (kernel 1 wrote tile_kept for every tile with i0 < n).
  const int* counts = tile_kept + b * gridDim.x;
  int base = 0;
  for (int t = tid; t < static_cast<int>(blockIdx.x); t += kBlock) base += counts[t];
  for (int offset = 16; offset > 0; offset >>= 1) base += __shfl_down_sync(0xffffffffu, base, offset);
  if (lane == 0) partial[warp] = base;

  // Exclusive prefix of the keep flags inside the tile: a ballot per warp, then the earlier warps' totals.
  const bool kept = i < n && keep[b * static_cast<int64_t>(n_tokens) + i] != 0;
  const unsigned ballot = __ballot_sync(0xffffffffu, kept);
  if (lane == 0) warp_kept[warp] = __popc(ballot);
  __syncthreads();

  base = 0;
  for (int w = 0; w < kWarps; ++w) base += partial[w];
  int position = __popc(ballot & ((1u << lane) - 1u));
  for (int w = 0; w < warp; ++w) position += warp_kept[w];
  if (kept) out[b * static_cast<int64_t>(k) + base + position] = i;
}

}  // namespace mrprune::kernels::topk
