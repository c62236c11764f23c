// Host launches (nvcc only) of the first two steps of the one-block-per-item selections over cosine Grams
// (diversity_select, coverage_select, bipartite_dedup) for a chunk of items: float32 features are normalised to unit
// rows u_i = x_i / max(||x_i||, 1e-12), then S = U U^T on FP32 FFMA; float16 / bfloat16 features (sm_80+) give
// inverse norms r_i, then S_ij = (x_i . x_j) r_i r_j from the raw rows on tensor cores (gram_launch.h), no upcast copy.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "mrprune/cuda/gram_launch.h"
#include "mrprune/kernels/selection.cuh"

namespace mrprune::cuda {

// Floats of the normalisation workspace per item: unit rows [N, D] (float32) or inverse norms [N] (half precision).
inline int64_t cosine_workspace(kernels::selection::Element element, int64_t tokens, int64_t dim) {
  return element == kernels::selection::Element::kFloat32 ? tokens * dim : tokens;
}

// x: the chunk's features [items, N, D] of `element`; lengths: its [items]; rows_ws: the chunk's normalisation
// workspace (cosine_workspace floats per item, valid rows written); sim [items, N, N] (valid blocks written); tiles:
// Gram tiles per side. vec: float32, the unit workspace is a fresh aligned allocation with D % 4 == 0; half
// precision, x's rows are 16-byte aligned with D % 8 == 0. Returns the first launch error.
inline cudaError_t launch_cosine_gram(kernels::selection::Element element, const void* x, const int64_t* lengths,
                                     int64_t items, int n_tokens, int n_dim, int64_t tiles, bool vec, float* rows_ws,
                                     float* sim, cudaStream_t stream) {
  namespace ks = kernels::selection;
  const int64_t rows = items * n_tokens;
  const unsigned blocks = static_cast<unsigned>(ks::row_blocks(rows));
  const bool raw_rows = element != ks::Element::kFloat32;
  ks::with_element(element, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* xt = static_cast<const T*>(x);
    if constexpr (std::is_same_v<T, float>) {
      ks::row_norm_kernel<ks::kNormThreads, ks::RowOut::kUnitRow, T>
          <<<blocks, ks::kNormThreads, 0, stream>>>(xt, lengths, rows, n_tokens, n_dim, nullptr, rows_ws);
    } else {
      ks::row_norm_kernel<ks::kNormThreads, ks::RowOut::kInverseNorm, T>
          <<<blocks, ks::kNormThreads, 0, stream>>>(xt, lengths, rows, n_tokens, n_dim, rows_ws, nullptr);
    }
  });
  const cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) return error;
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(tiles), static_cast<unsigned>(items));
  launch_gram(element, vec, grid, raw_rows ? x : rows_ws, lengths, n_tokens, n_dim, raw_rows ? rows_ws : nullptr, sim,
              stream);
  return cudaGetLastError();
}

}  // namespace mrprune::cuda
