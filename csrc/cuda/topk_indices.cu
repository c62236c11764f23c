// topk_indices on CUDA: rank counting per token (csrc/include/mrprune/kernels/topk.cuh), larger score first and the
// lower index on ties, so the result is deterministic and equal to the CPU kernel's. Spec:
// mrprune.reference.topk_indices.
//
// Written against the LibTorch stable ABI only (no torch/extension.h, ATen or c10/cuda), so plain nvcc can
// compile-check it against the CPU wheel's headers (scripts/check_cuda_compile.sh).
#include <cuda_runtime.h>
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "mrprune/cuda/checks.h"
#include "mrprune/kernels/topk.cuh"

namespace mrprune::cuda {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

namespace {

constexpr int kBlock = mrprune::kernels::topk::kDefaultBlock;

void check_launch(const char* what) { check_cuda(cudaGetLastError(), "topk_indices", what); }

}  // namespace

Tensor topk_indices_cuda(Tensor scores, Tensor lengths, int64_t k, bool sort_indices) {
  STD_TORCH_CHECK(scores.is_cuda(), "mrprune: scores must be a CUDA tensor");
  check_tensor(scores, "scores", 2, ScalarType::Float, scores.get_device_index());
  check_tensor(lengths, "lengths", 1, ScalarType::Long, scores.get_device_index());
  const int64_t batch = scores.size(0), tokens = scores.size(1);
  STD_TORCH_CHECK(lengths.size(0) == batch, "mrprune: lengths must have shape [B]");
  STD_TORCH_CHECK(0 <= k && k <= tokens, "mrprune: k must lie in [0, N]");
  STD_TORCH_CHECK(tokens <= std::numeric_limits<int>::max() - kBlock, "mrprune: topk_indices supports N < 2^31");

  // Allocations and the launch on the tensors' device, on its current stream.
  const torch::stable::accelerator::DeviceGuard guard(scores.get_device_index());
  Tensor out = torch::stable::new_empty(scores, {batch, k}, ScalarType::Long);
  if (batch == 0 || k == 0) return out;  // nothing to write (N == 0 implies k == 0)

  void* stream_handle = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(scores.get_device_index(), &stream_handle));
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_handle);

  namespace kt = mrprune::kernels::topk;
  const kt::LaunchPlan plan = kt::plan_launch(batch, tokens);
  const int n_tokens = static_cast<int>(tokens), budget = static_cast<int>(k);
  const int64_t tiles = plan.tiles;
  const float* s = scores.const_data_ptr<float>();
  const int64_t* len = lengths.const_data_ptr<int64_t>();
  int64_t* indices = out.mutable_data_ptr<int64_t>();

  // sort_indices: keep flags [B, N] and kept counts per tile [B, tiles] between the two kernels. Freed on return;
  // the caching allocator orders their reuse after the kernels on this stream.
  Tensor keep, tile_kept;
  uint8_t* keep_ptr = nullptr;
  int* tile_kept_ptr = nullptr;
  if (sort_indices) {
    keep = torch::stable::new_empty(scores, {batch, tokens}, ScalarType::Byte);
    tile_kept = torch::stable::new_empty(scores, {batch, tiles}, ScalarType::Int);
    keep_ptr = keep.mutable_data_ptr<uint8_t>();
    tile_kept_ptr = tile_kept.mutable_data_ptr<int32_t>();
  }

  for (int64_t b0 = 0; b0 < batch; b0 += plan.chunk) {  // gridDim.y <= 65535: the batch in chunks
    const int64_t chunk = std::min(plan.chunk, batch - b0);
    const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(chunk));
    const float* s_chunk = s + b0 * tokens;
    const int64_t* len_chunk = len + b0;
    int64_t* out_chunk = indices + b0 * k;
    if (sort_indices) {
      uint8_t* keep_chunk = keep_ptr + b0 * tokens;
      int* tile_kept_chunk = tile_kept_ptr + b0 * tiles;
      kt::topk_rank_kernel<kBlock, true><<<grid, kBlock, 0, stream>>>(s_chunk, len_chunk, n_tokens, budget, out_chunk,
                                                                      keep_chunk, tile_kept_chunk);
      check_launch("rank kernel");
      kt::topk_compact_kernel<kBlock><<<grid, kBlock, 0, stream>>>(len_chunk, n_tokens, budget, keep_chunk,
                                                                   tile_kept_chunk, out_chunk);
      check_launch("compaction kernel");
    } else {
      kt::topk_rank_kernel<kBlock, false><<<grid, kBlock, 0, stream>>>(s_chunk, len_chunk, n_tokens, budget,
                                                                       out_chunk, nullptr, nullptr);
      check_launch("rank kernel");
    }
  }
  return out;
}

}  // namespace mrprune::cuda

STABLE_TORCH_LIBRARY_IMPL(mrprune, CUDA, m) {
  m.impl("_topk_indices_cuda", TORCH_BOX(&mrprune::cuda::topk_indices_cuda));
}
