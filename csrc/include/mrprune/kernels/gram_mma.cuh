// Symmetric Gram of half-precision features on tensor cores, device code (torch-free), for the selections that take
// float16 / bfloat16 features natively (greedy_residual_select, diversity_select):
//     S[b, i, j] = (sum_c x[b, i, c] x[b, j, c]) * scale[b, i] * scale[b, j]      for i, j < n_b
// (scale null: the plain Gram G = X X^T of the greedy; scale = the inverse row norms: the cosine Gram of diversity).
//
// Why it is exact enough to replace the FP32 Gram of upcast features: a product of two bf16 (8-bit significands) or
// two fp16 (11-bit) numbers is exact in float32, and the tensor cores accumulate in float32, so S equals the float32
// computation on the upcast features up to summation order (the tolerance the kernels already have against the
// reference). Normalising in half precision first (what the official codes do) would lose accuracy, so the cosine
// scale is applied to the float32 result instead.
//
// Layout: 128 x 128 output tiles (gram_tiles(N) per side, the FP32 gram_kernel's grid), only the tiles on or above the
// diagonal compute. 8 warps (4 along the tile's rows x 2 along its columns), each 32 x 64 of the tile as 2 x 4
// m16n16k16 WMMA accumulators; k-tiles of 32 features double-buffered through shared memory (the next k-tile's
// global loads are in flight during the current MMAs). The epilogue stages each accumulator through shared memory and
// writes only entries i <= j, each to (i, j) and (j, i): S is bitwise symmetric whatever order the tensor cores sum
// in (the order is unspecified, so (i, j) and (j, i) of a diagonal tile need not agree in the last bit otherwise).
// WMMA needs sm_70 (fp16) / sm_80 (bf16); the launchers require sm_80 for half-precision features.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>

#include "mrprune/kernels/selection.cuh"

namespace mrprune::kernels::selection {

constexpr int kMmaTile = kGramTile;  // 128: the same tiles (and grid) as gram_kernel
constexpr int kMmaK = 32;            // features per k-tile
constexpr int kMmaLd = kMmaK + 8;    // shared row stride in elements: 80 bytes, keeps 32-byte fragment alignment
constexpr int kMmaThreads = 256;     // 8 warps
constexpr int kMmaWarpRows = 32, kMmaWarpCols = 64;
constexpr int kMmaSharedBytes = 2 * 2 * kMmaTile * kMmaLd * 2;  // [buffer][operand][row][k] of 16-bit elements

// vec: x's rows start 16-byte aligned and dim % 8 == 0 (16-byte loads of 8 elements); else element-wise loads.
template <class T, bool kVec>
__global__ void __launch_bounds__(kMmaThreads, 2)
    gram_mma_kernel(const T* __restrict__ x, const int64_t* __restrict__ lengths, int n_tokens, int dim,
                    const float* __restrict__ scale, float* __restrict__ gram) {
  static_assert(sizeof(T) == 2, "gram_mma_kernel takes 16-bit features");
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  namespace wmma = nvcuda::wmma;
  constexpr int kWarps = kMmaThreads / 32;
  constexpr int kStage = 16 * 16;  // one accumulator, float, per warp in the epilogue
  static_assert(kWarps * kStage * 4 <= kMmaSharedBytes, "the epilogue stage reuses the operand tiles");
  // The operand tiles as raw 16-bit words (loads only move bits); the epilogue reuses the same bytes.
  __shared__ __align__(128) uint16_t tiles[2][2][kMmaTile][kMmaLd];

  const GramTilePair pair = gram_tile_pair(lengths, n_tokens);
  if (!pair.live) return;  // block-uniform
  const int64_t b = pair.b;
  const int n = pair.n, i0 = pair.i0, j0 = pair.j0;

  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid >> 5, lane = tid & 31;
  const int warp_row = (warp & 3) * kMmaWarpRows, warp_col = (warp >> 2) * kMmaWarpCols;
  const uint16_t* item = reinterpret_cast<const uint16_t*>(x) + b * static_cast<int64_t>(n_tokens) * dim;

  // Loader: a k-tile of one operand is 128 rows x 32 elements = 512 chunks of 8 elements; thread tid brings chunks
  // tid and tid + 256 of both operands (rows past n and features past dim read as 0).
  constexpr int kChunks = 2;
  float4 held[2][kChunks];  // [operand][chunk], 8 elements each
  auto load = [&](int k0) {
#pragma unroll
    for (int operand = 0; operand < 2; ++operand) {
#pragma unroll
      for (int q = 0; q < kChunks; ++q) {
        const int chunk = tid + q * kMmaThreads;
        const int row = (operand == 0 ? i0 : j0) + (chunk >> 2), c = k0 + (chunk & 3) * 8;
        const uint16_t* src = item + static_cast<int64_t>(row < n ? row : 0) * dim + c;
        if constexpr (kVec) {
          held[operand][q] =
              (row < n && c < dim) ? __ldg(reinterpret_cast<const float4*>(src)) : make_float4(0.f, 0.f, 0.f, 0.f);
        } else {
          uint16_t e[8];
#pragma unroll
          for (int u = 0; u < 8; ++u) e[u] = (row < n && c + u < dim) ? src[u] : uint16_t{0};
          float4 v;
          memcpy(&v, e, sizeof(v));
          held[operand][q] = v;
        }
      }
    }
  };
  auto store = [&](int buf) {
#pragma unroll
    for (int operand = 0; operand < 2; ++operand) {
#pragma unroll
      for (int q = 0; q < kChunks; ++q) {
        const int chunk = tid + q * kMmaThreads;
        *reinterpret_cast<float4*>(&tiles[buf][operand][chunk >> 2][(chunk & 3) * 8]) = held[operand][q];
      }
    }
  };

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][4];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
#pragma unroll
    for (int c = 0; c < 4; ++c) wmma::fill_fragment(acc[r][c], 0.f);
  }

  double_buffered_k_loop<kMmaK>(dim, load, store, [&](int buf) {
    const T* tile_a = reinterpret_cast<const T*>(&tiles[buf][0][0][0]);
    const T* tile_b = reinterpret_cast<const T*>(&tiles[buf][1][0][0]);
#pragma unroll
    for (int kk = 0; kk < kMmaK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) wmma::load_matrix_sync(a[r], tile_a + (warp_row + 16 * r) * kMmaLd + kk, kMmaLd);
#pragma unroll
      for (int c = 0; c < 4; ++c) {  // one B fragment live at a time (registers)
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bt;  // column n of B = feature row j0 + n
        wmma::load_matrix_sync(bt, tile_b + (warp_col + 16 * c) * kMmaLd + kk, kMmaLd);
#pragma unroll
        for (int r = 0; r < 2; ++r) wmma::mma_sync(acc[r][c], a[r], bt, acc[r][c]);
      }
    }
  });

  // Epilogue (the k-loop's last barrier freed the operand tiles): per accumulator, stage it, then every lane writes its
  // entries with i <= j (i < j everywhere in an off-diagonal tile) to (i, j) and (j, i).
  float* stage = reinterpret_cast<float*>(&tiles[0][0][0][0]) + warp * kStage;
  float* out = gram + b * static_cast<int64_t>(n_tokens) * n_tokens;
  const float* item_scale = scale != nullptr ? scale + b * static_cast<int64_t>(n_tokens) : nullptr;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      wmma::store_matrix_sync(stage, acc[r][c], 16, wmma::mem_row_major);
      __syncwarp();
      for (int e = lane; e < kStage; e += 32) {
        const int i = i0 + warp_row + 16 * r + (e >> 4), j = j0 + warp_col + 16 * c + (e & 15);
        if (i > j || j >= n) continue;  // i <= j < n
        float v = stage[e];
        if (item_scale != nullptr) v = v * item_scale[i] * item_scale[j];
        out[static_cast<int64_t>(i) * n_tokens + j] = v;
        out[static_cast<int64_t>(j) * n_tokens + i] = v;
      }
      __syncwarp();  // the stage is rewritten by the next accumulator
    }
  }
#else
  __trap();  // launchers require sm_80
#endif
}

}  // namespace mrprune::kernels::selection
