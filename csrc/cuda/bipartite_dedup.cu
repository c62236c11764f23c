// bipartite_dedup on CUDA: VisPruner's even/odd similarity de-duplication (device code and the algorithm:
// csrc/include/mrprune/kernels/bipartite_dedup.cuh). Spec: mrprune.reference.bipartite_dedup.
//
// Per chunk of items: normalised rows, one symmetric FP32 cosine Gram S = U U^T (N^2 * 4 bytes per item), then one
// block per item runs every round. Items are processed in chunks whose workspaces stay below selection::kBlockWorkspaceBytes (at
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

#include "mrprune/cuda/checks.h"
#include "mrprune/cuda/selection_launch.h"
#include "mrprune/cuda/unit_gram.cuh"
#include "mrprune/kernels/bipartite_dedup.cuh"

namespace mrprune::cuda {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

namespace {

namespace ks = mrprune::kernels::selection;
namespace kb = mrprune::kernels::dedup;

void check_cuda(cudaError_t error, const char* what) { cuda::check_cuda(error, "bipartite_dedup", what); }

void check_launch(const char* what) { check_cuda(cudaGetLastError(), what); }

}  // namespace

Tensor bipartite_dedup_cuda(Tensor features, Tensor lengths, int64_t k, int64_t per_round) {
  const SelectionShape shape = check_selection_inputs(features, lengths, k, "bipartite_dedup");
  const int32_t device = shape.device;
  const int64_t batch = shape.batch, tokens = shape.tokens, dim = shape.dim;
  STD_TORCH_CHECK(per_round >= 1, "mrprune: bipartite_dedup: per_round must be >= 1");

  const SelectionOutput out(features, shape, k, "bipartite_dedup");  // holds the device guard until the return
  if (out.empty()) return out.indices();
  const cudaStream_t stream = out.stream();
  int64_t* out_ptr = out.data();

  const int n_tokens = static_cast<int>(tokens), n_dim = static_cast<int>(dim);
  const FeatureData x = feature_data(features, device, "bipartite_dedup");
  const int64_t* len = lengths.const_data_ptr<int64_t>();
  // More than N per round drops the same as N (r is capped by the remaining tokens).
  const int per_round_int = static_cast<int>(std::min<int64_t>(per_round, tokens));

  // The plan (kernels/bipartite_dedup.cuh): round state in shared memory when it fits, chunks, workspaces.
  auto* rounds = &kb::dedup_rounds_kernel<kb::kRoundThreads>;
  const kb::Plan plan = kb::plan(batch, tokens, dim, dynamic_shared_budget(rounds, device, "bipartite_dedup"));
  const bool state_in_shared = plan.state_in_shared;
  const int64_t dynamic_bytes = plan.dynamic_bytes, chunk = plan.chunk, tiles = plan.tiles;
  if (state_in_shared) allow_dynamic_shared(rounds, dynamic_bytes, "bipartite_dedup");

  Tensor unit =
      torch::stable::new_empty(features, {chunk, cosine_workspace(x.element, tokens, dim)}, ScalarType::Float);
  Tensor sim = torch::stable::new_empty(features, {chunk, tokens, tokens}, ScalarType::Float);
  Tensor order_ws, score_ws;
  int* order_ptr = nullptr;
  float* score_ptr = nullptr;
  if (!state_in_shared) {
    order_ws = torch::stable::new_empty(features, {chunk, 2, tokens}, ScalarType::Int);
    score_ws = torch::stable::new_empty(features, {chunk, tokens}, ScalarType::Float);
    order_ptr = order_ws.mutable_data_ptr<int>();
    score_ptr = score_ws.mutable_data_ptr<float>();
  }
  float* unit_ptr = unit.mutable_data_ptr<float>();
  float* sim_ptr = sim.mutable_data_ptr<float>();

  STD_TORCH_CHECK(tiles <= 65535, "mrprune: N too large for the Gram grid");

  for (int64_t b0 = 0; b0 < batch; b0 += chunk) {
    const int64_t items = std::min(chunk, batch - b0);
    const int64_t rows = items * tokens;
    const int64_t row_blocks = ks::row_blocks(rows);
    STD_TORCH_CHECK(row_blocks <= std::numeric_limits<int>::max(), "mrprune: B * N too large");
    const int64_t* len_chunk = len + b0;

    check_cuda(launch_cosine_gram(x.element, x.item(b0, tokens, dim), len_chunk, items, n_tokens, n_dim, tiles,
                                  x.half() ? x.vec(dim) : plan.vec4, unit_ptr, sim_ptr, stream),
               "row_norm_kernel / gram kernel launch");

    rounds<<<static_cast<unsigned>(items), kb::kRoundThreads, static_cast<size_t>(dynamic_bytes), stream>>>(
        sim_ptr, len_chunk, n_tokens, static_cast<int>(k), per_round_int, state_in_shared, order_ptr, score_ptr,
        out_ptr + b0 * k);
    check_launch("dedup_rounds_kernel launch");
  }
  return out.indices();
}

}  // namespace mrprune::cuda

STABLE_TORCH_LIBRARY_IMPL(mrprune, CUDA, m) {
  m.impl("_bipartite_dedup_cuda", TORCH_BOX(&mrprune::cuda::bipartite_dedup_cuda));
}
