// diversity_select on CUDA: DivPrune's greedy max-min cosine-distance selection (device code and the algorithm:
// csrc/include/mrprune/kernels/diversity_select.cuh). Spec: mrprune.reference.diversity_select.
//
// Per chunk of items: one symmetric FP32 similarity Gram S (N^2 * 4 bytes per item, as the official code's n x n
// distance matrix: 33 MB at N = 2880, 1 GiB at N = 16,384) -- float32 features: normalise the rows, S = U U^T on FP32
// FFMA; float16 / bfloat16 features (sm_80+): inverse row norms r, S_ij = (x_i . x_j) r_i r_j from the raw rows on
// tensor cores with float32 accumulation (products of half-precision numbers are exact in float32; no upcast copy)
// -- the first-pick scores (the second-smallest distance of every column), then one block per item runs all k steps
// on one row of S per step.
// Items are processed in chunks whose workspaces stay below kWorkspaceBytes (at least one item per chunk).
//
// Written against the LibTorch stable ABI only (no torch/extension.h, ATen or c10/cuda), so plain nvcc can
// compile-check it against the CPU wheel's headers (scripts/check_cuda_compile.sh).
#include <cuda_runtime.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "mrprune/cuda/checks.h"
#include "mrprune/cuda/gram_launch.h"
#include "mrprune/cuda/unit_gram.cuh"
#include "mrprune/cuda/selection_launch.h"
#include "mrprune/kernels/diversity_select.cuh"

namespace mrprune::cuda {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

namespace {

namespace ks = mrprune::kernels::selection;
namespace kd = mrprune::kernels::diversity;

void check_cuda(cudaError_t error, const char* what) { cuda::check_cuda(error, "diversity_select", what); }

void check_launch(const char* what) { check_cuda(cudaGetLastError(), what); }

}  // namespace

Tensor diversity_select_cuda(Tensor features, Tensor lengths, int64_t k, bool mask_picked) {
  const SelectionShape shape = check_selection_inputs(features, lengths, k, "diversity_select");
  const int32_t device = shape.device;
  const int64_t batch = shape.batch, tokens = shape.tokens, dim = shape.dim;

  const SelectionOutput out(features, shape, k, "diversity_select");  // holds the device guard until the return
  if (out.empty()) return out.indices();
  const cudaStream_t stream = out.stream();
  int64_t* out_ptr = out.data();

  const int n_tokens = static_cast<int>(tokens), n_dim = static_cast<int>(dim);
  const FeatureData x = feature_data(features, device, "diversity_select");
  const int64_t* len = lengths.const_data_ptr<int64_t>();

  // The plan (kernels/diversity_select.cuh): selection state in shared memory when it fits, chunks, workspaces.
  auto* select = &kd::diversity_select_kernel<kd::kSelectThreads>;
  const kd::Plan plan = kd::plan(batch, tokens, dim, dynamic_shared_budget(select, device, "diversity_select"));
  const bool state_in_shared = plan.state_in_shared;
  const int64_t dynamic_bytes = plan.dynamic_bytes, chunk = plan.chunk, tiles = plan.tiles;
  if (state_in_shared) allow_dynamic_shared(select, dynamic_bytes, "diversity_select");

  Tensor norm_ws = torch::stable::new_empty(features, {chunk, cosine_workspace(x.element, tokens, dim)},
                                            ScalarType::Float);
  Tensor sim = torch::stable::new_empty(features, {chunk, tokens, tokens}, ScalarType::Float);
  Tensor first = torch::stable::new_empty(features, {chunk, tokens}, ScalarType::Float);
  Tensor nearest_ws, picked_ws;
  float* nearest_ptr = nullptr;
  uint8_t* picked_ptr = nullptr;
  if (!state_in_shared) {
    nearest_ws = torch::stable::new_empty(features, {chunk, tokens}, ScalarType::Float);
    picked_ws = torch::stable::new_empty(features, {chunk, tokens}, ScalarType::Byte);
    nearest_ptr = nearest_ws.mutable_data_ptr<float>();
    picked_ptr = picked_ws.mutable_data_ptr<uint8_t>();
  }
  float* norm_ptr = norm_ws.mutable_data_ptr<float>();
  float* sim_ptr = sim.mutable_data_ptr<float>();
  float* first_ptr = first.mutable_data_ptr<float>();

  STD_TORCH_CHECK(tiles <= 65535, "mrprune: N too large for the Gram grid");
  const bool vec = x.half() ? x.vec(dim) : plan.vec4;  // the features' own rows, or the fresh unit workspace

  for (int64_t b0 = 0; b0 < batch; b0 += chunk) {
    const int64_t items = std::min(chunk, batch - b0);
    const int64_t rows = items * tokens;
    const int64_t row_blocks = ks::row_blocks(rows);
    STD_TORCH_CHECK(row_blocks <= std::numeric_limits<int>::max(), "mrprune: B * N too large");
    const int64_t* len_chunk = len + b0;

    check_cuda(launch_cosine_gram(x.element, x.item(b0, tokens, dim), len_chunk, items, n_tokens, n_dim, tiles, vec,
                                  norm_ptr, sim_ptr, stream),
               "row_norm_kernel / gram kernel launch");

    kd::first_score_kernel<kd::kScoreThreads>
        <<<static_cast<unsigned>(ks::row_blocks(rows, kd::kScoreThreads)), kd::kScoreThreads, 0, stream>>>(
            sim_ptr, len_chunk, rows, n_tokens, first_ptr);
    check_launch("first_score_kernel launch");

    select<<<static_cast<unsigned>(items), kd::kSelectThreads, static_cast<size_t>(dynamic_bytes), stream>>>(
        sim_ptr, first_ptr, len_chunk, n_tokens, static_cast<int>(k), mask_picked, state_in_shared, nearest_ptr,
        picked_ptr, out_ptr + b0 * k);
    check_launch("diversity_select_kernel launch");
  }
  return out.indices();
}

}  // namespace mrprune::cuda

STABLE_TORCH_LIBRARY_IMPL(mrprune, CUDA, m) {
  m.impl("_diversity_select_cuda", TORCH_BOX(&mrprune::cuda::diversity_select_cuda));
}
