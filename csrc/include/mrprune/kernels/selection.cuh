// The selection skeleton of the one-launch CUDA selections (greedy_residual_select, diversity_select,
// coverage_select, bipartite_dedup), device code (torch-free): feature elements (float32 or float16 / bfloat16 read
// natively), row norms, the symmetric FP32 Gram kernel (the tensor-core one for half precision is
// kernels/gram_mma.cuh), and the block / cross-block argmax with ties to the lower index.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#if defined(MRPRUNE_CUDA_EMULATION)
#include <atomic>
#endif

namespace mrprune::kernels::selection {

// ---------------------------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------------------------

__device__ __forceinline__ float negative_infinity() { return __int_as_float(static_cast<int>(0xff800000u)); }
__device__ __forceinline__ float positive_infinity() { return __int_as_float(0x7f800000); }

// lengths[b] clamped to [0, n_tokens] (the Python router validates it; the clamp keeps a bad length in bounds).
__device__ __forceinline__ int valid_length(const int64_t* lengths, int64_t b, int n_tokens) {
  const int64_t n = lengths[b];
  return n < 0 ? 0 : (n > n_tokens ? n_tokens : static_cast<int>(n));
}

__device__ __forceinline__ int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Feature elements: float32, or float16 / bfloat16 read natively (converted one element at a time, exactly, never as
// an upcast copy of the features).
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// The feature dtypes of the selections that take half precision (greedy_residual_select, diversity_select).
enum class Element { kFloat32, kFloat16, kBFloat16 };

// Calls f(static_cast<T*>(nullptr)) with T the C++ type of `e` (float, __half or __nv_bfloat16): one dispatch for the
// launchers and the CPU emulation.
template <class F>
decltype(auto) with_element(Element e, F&& f) {
  switch (e) {
    case Element::kFloat16:
      return f(static_cast<__half*>(nullptr));
    case Element::kBFloat16:
      return f(static_cast<__nv_bfloat16*>(nullptr));
    default:
      return f(static_cast<float*>(nullptr));
  }
}

// Four consecutive features c4 * 4 .. c4 * 4 + 3 of a row as float32 (0 past dim). vec: float32 rows that are
// 16-byte aligned with dim % 4 == 0 (one float4 load); half-precision rows are read element by element.
template <class T>
__device__ __forceinline__ float4 load_four(const T* __restrict__ row, int c4, int dim, bool vec) {
  const int c = 4 * c4;
  if constexpr (sizeof(T) == sizeof(float)) {
    if (vec) return __ldg(reinterpret_cast<const float4*>(row) + c4);
  }
  return make_float4(to_float(row[c]), c + 1 < dim ? to_float(row[c + 1]) : 0.f,
                     c + 2 < dim ? to_float(row[c + 2]) : 0.f, c + 3 < dim ? to_float(row[c + 3]) : 0.f);
}

#if defined(MRPRUNE_CUDA_EMULATION)
// The CPU emulation (csrc/emu) runs blocks as OS threads: the same acquire / release in the C++ memory model.
__device__ __forceinline__ int load_acquire(const int* p) {
  return std::atomic_ref<int>(*const_cast<int*>(p)).load(std::memory_order_acquire);
}

__device__ __forceinline__ void store_release(int* p, int v) {
  std::atomic_ref<int>(*p).store(v, std::memory_order_release);
}
#else
__device__ __forceinline__ int load_acquire(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void store_release(int* p, int v) {
  asm volatile("st.release.gpu.b32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
#endif

// A candidate pivot: its gated score, its un-gated energy (the value reported for a pick) and its token index
// (-1: none). `better` is a strict total order on candidates with an index: larger score first, then the lower
// index; any candidate beats none. Every reduction below is therefore exact and independent of the order in which
// candidates meet.
struct Pick {
  float score;
  float energy;
  int index;
};

__device__ __forceinline__ Pick no_pick() { return Pick{0.f, 0.f, -1}; }

__device__ __forceinline__ bool better(const Pick& a, const Pick& b) {
  if (a.index < 0) return false;
  if (b.index < 0) return true;
  if (a.score != b.score) return a.score > b.score;
  return a.index < b.index;
}

__device__ __forceinline__ Pick warp_best(Pick p) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    Pick o;
    o.score = __shfl_xor_sync(0xffffffffu, p.score, offset);
    o.energy = __shfl_xor_sync(0xffffffffu, p.energy, offset);
    o.index = __shfl_xor_sync(0xffffffffu, p.index, offset);
    if (better(o, p)) p = o;
  }
  return p;
}

// The best candidate of the block, returned to every thread. scratch: kThreads / 32 entries of shared memory.
// Starts and ends with a barrier-free warp phase; contains two __syncthreads (call it from uniform control flow).
template <int kThreads>
__device__ __forceinline__ Pick block_best(Pick p, Pick* scratch) {
  constexpr int kWarps = kThreads / 32;
  p = warp_best(p);
  const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
  if (lane == 0) scratch[warp] = p;
  __syncthreads();
  Pick best = scratch[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) {
    if (better(scratch[w], best)) best = scratch[w];
  }
  __syncthreads();  // scratch may be rewritten right after
  return best;
}

// ---------------------------------------------------------------------------------------------------------------
// Cross-block exchange: a per-item all-gather of one candidate per block
// ---------------------------------------------------------------------------------------------------------------
//
// slots: [2][items][parts] (double-buffered by round parity), zeroed before the launch. In round q (q = 0, 1, ...,
// consecutive rounds alternate parity) block p writes its candidate to slot [q & 1][item][p] with tag q + 1
// (payload first, then the tag with release semantics after a fence), and every block of the item waits until all
// `parts` slots of the round carry that tag (acquire), then reduces them. Reusing a parity buffer two rounds later is
// safe: a block can only publish round q + 2 after it has seen every block's round q + 1 candidate, which each
// block published after it had finished reading round q. Writes a block made before publishing (factor rows,
// picked flags) are visible to every block after the exchange (the pattern of cooperative_groups' grid sync:
// __syncthreads, fence + release by one thread; acquire by the readers, then __syncthreads); such data
// is still read with ld.global.cg (L2) so that no stale L1 line can be hit. The readers need no fence after the
// acquire (cooperative_groups' grid sync likewise ends its wait with an ld.acquire.gpu on sm_70+). An item served by
// a single block skips the exchange.
struct alignas(16) Slot {
  float score;
  float energy;
  int index;
  int tag;
};

template <int kThreads>
__device__ Pick exchange(Pick mine, Slot* item_slots_even, Slot* item_slots_odd, int part, int parts, int round,
                         Pick* scratch) {
  const Pick block = block_best<kThreads>(mine, scratch);  // ends with __syncthreads: the block's writes are done
  if (parts == 1) return block;                            // item-uniform: a lone block needs no exchange
  Slot* slots = (round & 1) ? item_slots_odd : item_slots_even;
  const int tag = round + 1;
  if (threadIdx.x == 0) {
    Slot* s = slots + part;
    __stcg(&s->score, block.score);
    __stcg(&s->energy, block.energy);
    __stcg(&s->index, block.index);
    __threadfence();
    store_release(&s->tag, tag);
  }
  Pick best = no_pick();
  for (int q = static_cast<int>(threadIdx.x); q < parts; q += kThreads) {
    const Slot* s = slots + q;
    while (load_acquire(&s->tag) != tag) __nanosleep(20);  // the last (successful) load is the acquire
    const Pick c{__ldcg(&s->score), __ldcg(&s->energy), __ldcg(&s->index)};
    if (better(c, best)) best = c;
  }
  return block_best<kThreads>(best, scratch);
}

// ---------------------------------------------------------------------------------------------------------------
// Row norms
// ---------------------------------------------------------------------------------------------------------------

// Threads per block of row_norm_kernel as the launchers run it (one warp per row).
constexpr int kNormThreads = 256;

// Blocks of a row_norm_kernel<kNormThreads> launch over `rows` rows (also used for first_score_kernel).
inline int64_t row_blocks(int64_t rows, int threads = kNormThreads) {
  const int64_t per_block = threads / 32;
  return (rows + per_block - 1) / per_block;
}

// What row_norm_kernel writes per row r of the flattened [items * N] rows (valid rows of every item):
//   kSquaredNorm: out[r] = ||x_r||^2 (0 for padding);
//   kInverseNorm: out[r] = 1 / max(||x_r||, 1e-12) (0 for padding), the scale of a cosine Gram computed from raw rows;
//   kUnitRow:     u_r = x_r / max(||x_r||, 1e-12) written to `normalized` (the reference's normalize_rows; padding
//                 rows untouched).
enum class RowOut { kSquaredNorm, kInverseNorm, kUnitRow };

// One warp per row; a fixed reduction order, so results are deterministic. T: float, __half or __nv_bfloat16 (each
// element squared in float32, exactly for half precision).
template <int kThreads, RowOut kOut, class T = float>
__global__ void __launch_bounds__(kThreads)
    row_norm_kernel(const T* __restrict__ x, const int64_t* __restrict__ lengths, int64_t rows, int n_tokens,
                    int dim, float* __restrict__ out, float* __restrict__ normalized) {
  constexpr int kWarps = kThreads / 32;
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (r >= rows) return;  // warp-uniform
  const int64_t b = r / n_tokens;
  const int i = static_cast<int>(r - b * n_tokens);
  if (i >= valid_length(lengths, b, n_tokens)) {
    if (kOut != RowOut::kUnitRow && lane == 0) out[r] = 0.f;
    return;
  }
  const T* row = x + r * static_cast<int64_t>(dim);
  float sum = 0.f;
  for (int c = lane; c < dim; c += 32) {
    const float v = to_float(row[c]);
    sum = fmaf(v, v, sum);
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  if constexpr (kOut == RowOut::kUnitRow) {
    const float denom = fmaxf(sqrtf(sum), 1e-12f);
    float* dst = normalized + r * static_cast<int64_t>(dim);
    for (int c = lane; c < dim; c += 32) dst[c] = to_float(row[c]) / denom;
  } else if constexpr (kOut == RowOut::kInverseNorm) {
    if (lane == 0) out[r] = 1.f / fmaxf(sqrtf(sum), 1e-12f);
  } else {
    if (lane == 0) out[r] = sum;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Symmetric Gram: S[b, i, j] = sum_c x[b, i, c] x[b, j, c] for i, j < n_b
// ---------------------------------------------------------------------------------------------------------------
//
// A plain FP32 (FFMA, never TF32) tiled GEMM of the item's rows with themselves: 128 x 128 output tiles, k-tiles of
// 8 double-buffered through shared memory, 256 threads with an 8 x 8 register tile each (two 4-wide halves, so every
// shared-memory read is a conflict-free float4 broadcast). Grid (T, T, items) with T = ceil(N / 128); only the
// tiles on or above the diagonal compute (half the multiply-adds), and each writes its block of S and, mirrored, the
// transposed block, so S is exactly (bitwise) symmetric, as the CPU kernels' Grams. The diagonal tiles are
// symmetric too: entries (i, j) and (j, i) accumulate the same products in the same order (fma is commutative in
// its factors). Only the valid n_b x n_b block of each item is written; padding rows and columns are never read.
// Why our own kernel rather than cuBLAS: no dependence on torch's TF32 switches (which would change the picks), an
// exactly symmetric result, half the work, and no workspace or handle (N = 2880, D = 4096: about 17 G FMA).
constexpr int kGramTile = 128;
constexpr int kGramK = 8;
constexpr int kGramThreads = 256;

// The k-loop of the Gram kernels, double-buffered through shared memory: load(k0) brings the k-tile at feature k0
// into registers, store(buf) puts it into shared buffer buf, compute(buf) consumes buffer buf. The next k-tile's
// global loads are in flight while the current one computes. Contains barriers: call it from uniform control flow.
template <int kK, class Load, class Store, class Compute>
__device__ __forceinline__ void double_buffered_k_loop(int dim, Load&& load, Store&& store, Compute&& compute) {
  const int k_tiles = (dim + kK - 1) / kK;
  load(0);
  store(0);
  __syncthreads();
  for (int kt = 0; kt < k_tiles; ++kt) {
    const int buf = kt & 1;
    const bool more = kt + 1 < k_tiles;
    if (more) load((kt + 1) * kK);
    compute(buf);
    // The other buffer was last read in iteration kt - 1, which every thread finished before the barrier below
    // (iteration kt - 1's); the barrier after the store publishes it for iteration kt + 1.
    if (more) store(buf ^ 1);
    __syncthreads();
  }
}

// The block's output tile pair of a symmetric Gram launch (grid (T, T, items)): rows i0 and columns j0 of item b,
// whose valid length is n. live: the tile is on or above the diagonal and holds valid entries (the lower triangle is
// written by the mirrored stores of the upper one); a block-uniform early return otherwise.
struct GramTilePair {
  int64_t b;
  int n, i0, j0;
  bool live;
};

__device__ __forceinline__ GramTilePair gram_tile_pair(const int64_t* lengths, int n_tokens) {
  GramTilePair t;
  const int tile_j = static_cast<int>(blockIdx.x), tile_i = static_cast<int>(blockIdx.y);
  t.b = blockIdx.z;
  t.n = valid_length(lengths, t.b, n_tokens);
  t.i0 = tile_i * kGramTile, t.j0 = tile_j * kGramTile;
  t.live = tile_i <= tile_j && t.j0 < t.n;  // i0 <= j0 < n
  return t;
}

// Tiles per side of an N x N Gram (gridDim.x = gridDim.y; the launchers require it <= 65535).
inline int64_t gram_tiles(int64_t tokens) { return (tokens + kGramTile - 1) / kGramTile; }

template <bool kVec4>
__global__ void __launch_bounds__(kGramThreads, 2)
    gram_kernel(const float* __restrict__ x, const int64_t* __restrict__ lengths, int n_tokens, int dim,
                float* __restrict__ gram) {
  constexpr int kPad = kGramTile + 4;  // row stride of the k-major tiles (keeps float4 alignment, spreads banks)
  __shared__ __align__(16) float tile_a[2][kGramK][kPad];
  __shared__ __align__(16) float tile_b[2][kGramK][kPad];

  const GramTilePair pair = gram_tile_pair(lengths, n_tokens);
  if (!pair.live) return;  // block-uniform
  const int64_t b = pair.b;
  const int n = pair.n, i0 = pair.i0, j0 = pair.j0;

  const int tid = static_cast<int>(threadIdx.x);
  const int tx = tid & 15, ty = tid >> 4;
  // Loader: thread tid brings 4 consecutive features of row (tid / 2) of each operand tile.
  const int load_row = tid >> 1, load_col = (tid & 1) * 4;
  const int row_a = i0 + load_row, row_b = j0 + load_row;
  const bool ok_a = row_a < n, ok_b = row_b < n;
  const float* item = x + b * static_cast<int64_t>(n_tokens) * dim;
  const float* src_a = item + static_cast<int64_t>(ok_a ? row_a : 0) * dim;
  const float* src_b = item + static_cast<int64_t>(ok_b ? row_b : 0) * dim;

  float reg_a[4], reg_b[4];
  auto load = [&](int k0) {
    const int c = k0 + load_col;
    if constexpr (kVec4) {  // dim % 4 == 0: c < dim implies c + 3 < dim, and rows are 16-byte aligned
      float4 va = make_float4(0.f, 0.f, 0.f, 0.f), vb = va;
      if (ok_a && c < dim) va = __ldg(reinterpret_cast<const float4*>(src_a + c));
      if (ok_b && c < dim) vb = __ldg(reinterpret_cast<const float4*>(src_b + c));
      reg_a[0] = va.x, reg_a[1] = va.y, reg_a[2] = va.z, reg_a[3] = va.w;
      reg_b[0] = vb.x, reg_b[1] = vb.y, reg_b[2] = vb.z, reg_b[3] = vb.w;
    } else {
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        reg_a[q] = (ok_a && c + q < dim) ? __ldg(src_a + c + q) : 0.f;
        reg_b[q] = (ok_b && c + q < dim) ? __ldg(src_b + c + q) : 0.f;
      }
    }
  };
  auto store = [&](int buf) {
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      tile_a[buf][load_col + q][load_row] = reg_a[q];
      tile_b[buf][load_col + q][load_row] = reg_b[q];
    }
  };

  float acc[8][8];
#pragma unroll
  for (int r = 0; r < 8; ++r) {
#pragma unroll
    for (int c = 0; c < 8; ++c) acc[r][c] = 0.f;
  }

  double_buffered_k_loop<kGramK>(dim, load, store, [&](int buf) {
#pragma unroll
    for (int kk = 0; kk < kGramK; ++kk) {
      const float4 a0 = *reinterpret_cast<const float4*>(&tile_a[buf][kk][ty * 4]);
      const float4 a1 = *reinterpret_cast<const float4*>(&tile_a[buf][kk][64 + ty * 4]);
      const float4 b0 = *reinterpret_cast<const float4*>(&tile_b[buf][kk][tx * 4]);
      const float4 b1 = *reinterpret_cast<const float4*>(&tile_b[buf][kk][64 + tx * 4]);
      const float a[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
      const float bb[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
      for (int r = 0; r < 8; ++r) {
#pragma unroll
        for (int c = 0; c < 8; ++c) acc[r][c] = fmaf(a[r], bb[c], acc[r][c]);
      }
    }
  });

  float* out = gram + b * static_cast<int64_t>(n_tokens) * n_tokens;
  const bool mirror = i0 != j0;
#pragma unroll
  for (int r = 0; r < 8; ++r) {
    const int i = i0 + (r < 4 ? ty * 4 + r : 64 + ty * 4 + (r - 4));
    if (i >= n) continue;
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      const int j = j0 + (c < 4 ? tx * 4 + c : 64 + tx * 4 + (c - 4));
      if (j >= n) continue;
      out[static_cast<int64_t>(i) * n_tokens + j] = acc[r][c];
      if (mirror) out[static_cast<int64_t>(j) * n_tokens + i] = acc[r][c];
    }
  }
}

}  // namespace mrprune::kernels::selection
