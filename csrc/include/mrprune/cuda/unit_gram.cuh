// Host launches (nvcc only) of the first two steps of the one-block-per-item selections over cosine Grams
// (coverage_select, bipartite_dedup): unit rows u_i = x_i / max(||x_i||, 1e-12) of a chunk of items, then their
// symmetric FP32 Gram, with the selection skeleton's kernels (kernels/selection.cuh) and the chunk's
// plan (kernels/block_selection.cuh).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "mrprune/cuda/gram_launch.h"
#include "mrprune/kernels/block_selection.cuh"
#include "mrprune/kernels/selection.cuh"

namespace mrprune::cuda {

// x: the chunk's features [items, N, D]; lengths: its [items]; unit [items, N, D] and sim [items, N, N] are written
// (valid rows and blocks only). Returns the first launch error (cudaSuccess when both launched).
inline cudaError_t launch_unit_gram(const float* x, const int64_t* lengths, int64_t items, int n_tokens, int n_dim,
                                    const kernels::selection::BlockPlan& plan, float* unit, float* sim,
                                    cudaStream_t stream) {
  namespace ks = kernels::selection;
  const int64_t rows = items * n_tokens;
  ks::row_norm_kernel<ks::kNormThreads, ks::RowOut::kUnitRow><<<static_cast<unsigned>(ks::row_blocks(rows)), ks::kNormThreads, 0,
                                                stream>>>(x, lengths, rows, n_tokens, n_dim, nullptr, unit);
  const cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) return error;
  const dim3 grid(static_cast<unsigned>(plan.tiles), static_cast<unsigned>(plan.tiles), static_cast<unsigned>(items));
  launch_gram(ks::Element::kFloat32, plan.vec4, grid, unit, lengths, n_tokens, n_dim, nullptr, sim, stream);
  return cudaGetLastError();
}

}  // namespace mrprune::cuda
