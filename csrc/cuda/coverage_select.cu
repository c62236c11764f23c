// coverage_select on CUDA: SCOPE's saliency-weighted greedy coverage (device code and the algorithm:
// csrc/include/mrprune/kernels/coverage_select.cuh). Spec: mrprune.reference.coverage_select.
//
// Per chunk of items: squared row norms (the spec's exact-1 diagonal), normalised rows, one symmetric FP32 cosine
// Gram S = U U^T (N^2 * 4 bytes per item: 33 MB at N = 2880), then one block per item runs all k steps, each over
// the item's whole n x n block of S. Items are processed in chunks whose workspaces stay below selection::kBlockWorkspaceBytes (at
// least one item per chunk).
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
#include <optional>

#include "mrprune/cuda/checks.h"
#include "mrprune/cuda/selection_launch.h"
#include "mrprune/cuda/unit_gram.cuh"
#include "mrprune/kernels/coverage_select.cuh"

namespace mrprune::cuda {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

namespace {

namespace ks = mrprune::kernels::selection;
namespace kc = mrprune::kernels::coverage;

void check_cuda(cudaError_t error, const char* what) { cuda::check_cuda(error, "coverage_select", what); }

void check_launch(const char* what) { check_cuda(cudaGetLastError(), what); }

}  // namespace

Tensor coverage_select_cuda(Tensor features, Tensor lengths, int64_t k, std::optional<Tensor> saliency,
                            double alpha) {
  const SelectionShape shape = check_selection_inputs(features, lengths, k, "coverage_select");
  const int32_t device = shape.device;
  const int64_t batch = shape.batch, tokens = shape.tokens, dim = shape.dim;
  if (saliency.has_value()) {
    check_tensor(*saliency, "saliency", 2, ScalarType::Float, device);
    STD_TORCH_CHECK(saliency->size(0) == batch && saliency->size(1) == tokens,
                    "mrprune: coverage_select: saliency must have shape [B, N]");
  }

  const SelectionOutput out(features, shape, k, "coverage_select");  // holds the device guard until the return
  if (out.empty()) return out.indices();
  const cudaStream_t stream = out.stream();
  int64_t* out_ptr = out.data();

  const int n_tokens = static_cast<int>(tokens), n_dim = static_cast<int>(dim);
  const FeatureData x = feature_data(features, device, "coverage_select");
  const int64_t* len = lengths.const_data_ptr<int64_t>();
  const float* saliency_ptr = saliency.has_value() ? saliency->const_data_ptr<float>() : nullptr;

  // The plan (kernels/coverage_select.cuh): selection state in shared memory when it fits, chunks, workspaces.
  auto* select = &kc::coverage_select_kernel<kc::kSelectThreads>;
  const kc::Plan plan = kc::plan(batch, tokens, dim, dynamic_shared_budget(select, device, "coverage_select"));
  const bool state_in_shared = plan.state_in_shared;
  const int64_t dynamic_bytes = plan.dynamic_bytes, chunk = plan.chunk, tiles = plan.tiles;
  if (state_in_shared) allow_dynamic_shared(select, dynamic_bytes, "coverage_select");

  Tensor norm2 = torch::stable::new_empty(features, {chunk, tokens}, ScalarType::Float);
  Tensor unit =
      torch::stable::new_empty(features, {chunk, cosine_workspace(x.element, tokens, dim)}, ScalarType::Float);
  Tensor sim = torch::stable::new_empty(features, {chunk, tokens, tokens}, ScalarType::Float);
  Tensor cur_ws, weight_ws, picked_ws;
  float* cur_ptr = nullptr;
  float* weight_ptr = nullptr;
  uint8_t* picked_ptr = nullptr;
  if (!state_in_shared) {
    cur_ws = torch::stable::new_empty(features, {chunk, tokens}, ScalarType::Float);
    weight_ws = torch::stable::new_empty(features, {chunk, tokens}, ScalarType::Float);
    picked_ws = torch::stable::new_empty(features, {chunk, tokens}, ScalarType::Byte);
    cur_ptr = cur_ws.mutable_data_ptr<float>();
    weight_ptr = weight_ws.mutable_data_ptr<float>();
    picked_ptr = picked_ws.mutable_data_ptr<uint8_t>();
  }
  float* norm2_ptr = norm2.mutable_data_ptr<float>();
  float* unit_ptr = unit.mutable_data_ptr<float>();
  float* sim_ptr = sim.mutable_data_ptr<float>();

  STD_TORCH_CHECK(tiles <= 65535, "mrprune: N too large for the Gram grid");
  const float alpha_f = static_cast<float>(alpha);

  for (int64_t b0 = 0; b0 < batch; b0 += chunk) {
    const int64_t items = std::min(chunk, batch - b0);
    const int64_t rows = items * tokens;
    const int64_t row_blocks = ks::row_blocks(rows);
    STD_TORCH_CHECK(row_blocks <= std::numeric_limits<int>::max(), "mrprune: B * N too large");
    const int64_t* len_chunk = len + b0;
    const void* x_chunk = x.item(b0, tokens, dim);

    launch_squared_norms(x.element, x_chunk, len_chunk, rows, n_tokens, n_dim, norm2_ptr, stream);
    check_launch("row_norm_kernel launch");
    check_cuda(launch_cosine_gram(x.element, x_chunk, len_chunk, items, n_tokens, n_dim, tiles,
                                  x.half() ? x.vec(dim) : plan.vec4, unit_ptr, sim_ptr, stream),
               "row_norm_kernel / gram kernel launch");

    select<<<static_cast<unsigned>(items), kc::kSelectThreads, static_cast<size_t>(dynamic_bytes), stream>>>(
        sim_ptr, norm2_ptr, saliency_ptr != nullptr ? saliency_ptr + b0 * tokens : nullptr, alpha_f, len_chunk,
        n_tokens, static_cast<int>(k), state_in_shared, cur_ptr, weight_ptr, picked_ptr, out_ptr + b0 * k);
    check_launch("coverage_select_kernel launch");
  }
  return out.indices();
}

}  // namespace mrprune::cuda

STABLE_TORCH_LIBRARY_IMPL(mrprune, CUDA, m) {
  m.impl("_coverage_select_cuda", TORCH_BOX(&mrprune::cuda::coverage_select_cuda));
}
