// greedy_residual_select on CUDA: ResPrune's weighted greedy residual-energy selection as a weighted pivoted
// partial Cholesky, all k steps of every item in one cooperative launch (device code and the algorithm:
// csrc/include/mrprune/kernels/greedy_residual_select.cuh). Spec: mrprune.reference.greedy_residual_select.
//
// Form choice (the `algorithm` argument; "auto" decides by shape and free memory). Both forms run the same pivoted
// Cholesky and the same selection kernel; they differ in where the Gram row G[j, :] of each pivot comes from:
//   * "gram": one symmetric Gram per item (N^2 D / 2 multiply-adds: FP32 FFMA for float32 features, tensor cores
//     with float32 accumulation for float16 / bfloat16 ones, kernels/gram_mma.cuh), then one streamed row of it per
//     step. Memory: N^2 * 4 bytes per item in flight (33 MB at N = 2880, 268 MB at 8192,
//     1 GiB at 16,384).
//   * "basis": no Gram; each step computes G[j, i] = x_j . x_i for every token, one GEMV over the item's features
//     (k N D multiply-adds, memory-bound) -- the per-step cost profile of the reference's Gram-Schmidt basis form.
//     A literal Gram-Schmidt basis is not used on the GPU: orthogonalising x_j twice against the basis, normalising
//     it and projecting all tokens are dependent reductions over D and over N, i.e. about five grid-wide
//     synchronisations per step instead of the one exchange the Cholesky update needs, and both forms pick the same
//     tokens up to rounding (the op's contract).
// Half-precision features (sm_80+) are read natively everywhere (norms, Gram, the basis form's rows): products of two
// half-precision numbers are exact in float32, so no N x D upcast copy is made.
// Both forms also keep the factor ([N, min(k, N)] per item, never more than the features when k <= D). "auto" takes
// the Gram when it is at most max(1 GiB, a quarter of the free memory) and N^2 D / (2 * kGemmSpeedup) < k N D, i.e.
// N < 2 * kGemmSpeedup * k: the Gram kernel does a multiply-add ~kGemmSpeedup times faster than a step streams one
// (FFMA peak vs HBM bandwidth on H100/H200, ~60 TFLOP/s vs ~3.5-4.8 TB/s of float32, derated; kMmaSpeedup for the
// tensor-core Gram of half-precision features). K = 640 of N = 2880 (LLaVA-NeXT) and K = 2731 of N = 8192
// (Qwen2.5-VL) take the Gram; float32 k = 64 of 16,384 does not.
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
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>

#include "mrprune/cuda/checks.h"
#include "mrprune/cuda/gram_launch.h"
#include "mrprune/cuda/selection_launch.h"
#include "mrprune/kernels/greedy_residual_select.cuh"

namespace mrprune::cuda {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

namespace {

namespace ks = mrprune::kernels::selection;
namespace kg = mrprune::kernels::greedy;

void check_cuda(cudaError_t error, const char* what) { cuda::check_cuda(error, "greedy_residual_select", what); }

void check_launch(const char* what) { check_cuda(cudaGetLastError(), what); }

kg::Form parse_form(const std::string& algorithm) {
  if (algorithm == "gram") return kg::Form::kGram;
  if (algorithm == "basis") return kg::Form::kRows;
  return kg::Form::kAuto;
}

// The selection kernel of a form: the gram form reads only the Gram (T = float); the rows form reads features of T.
template <class T>
void* select_kernel(bool use_gram) {
  return use_gram ? reinterpret_cast<void*>(&kg::greedy_select_kernel<kg::kSelectThreads, true>)
                  : reinterpret_cast<void*>(&kg::greedy_select_kernel<kg::kSelectThreads, false, T>);
}

}  // namespace

std::tuple<Tensor, Tensor> greedy_residual_select_cuda(Tensor features, Tensor lengths, int64_t k,
                                                       std::optional<Tensor> gate, std::optional<Tensor> seed,
                                                       double exhaustion_tol, std::string algorithm) {
  const SelectionShape shape = check_selection_inputs(features, lengths, k, "greedy_residual_select");
  const int32_t device = shape.device;
  const int64_t batch = shape.batch, tokens = shape.tokens, dim = shape.dim;
  if (gate.has_value()) {
    check_tensor(*gate, "gate", 2, ScalarType::Float, device);
    STD_TORCH_CHECK(gate->size(0) == batch && gate->size(1) == tokens, "mrprune: gate must have shape [B, N]");
  }
  if (seed.has_value()) {
    check_tensor(*seed, "seed", 1, ScalarType::Long, device);
    STD_TORCH_CHECK(seed->size(0) == batch, "mrprune: seed must have shape [B]");
  }
  STD_TORCH_CHECK(algorithm == "auto" || algorithm == "gram" || algorithm == "basis",
                  "mrprune: algorithm must be 'auto', 'gram' or 'basis'");
  STD_TORCH_CHECK(0.0 <= exhaustion_tol && exhaustion_tol < 1.0, "mrprune: exhaustion_tol must lie in [0, 1)");

  const torch::stable::accelerator::DeviceGuard guard(device);
  Tensor indices = torch::stable::new_empty(features, {batch, k}, ScalarType::Long);
  Tensor energies = torch::stable::new_empty(features, {batch, k}, ScalarType::Float);
  if (batch == 0 || k == 0) return {indices, energies};  // (N == 0 implies k == 0)

  void* stream_handle = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(device, &stream_handle));
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_handle);
  int64_t* out_indices = indices.mutable_data_ptr<int64_t>();
  float* out_energies = energies.mutable_data_ptr<float>();
  // -1 everywhere (padding past n_b) and energy 0 (fill picks and padding): the kernel writes the rest.
  check_cuda(cudaMemsetAsync(out_indices, 0xff, static_cast<size_t>(batch * k) * sizeof(int64_t), stream), "memset");
  check_cuda(cudaMemsetAsync(out_energies, 0, static_cast<size_t>(batch * k) * sizeof(float), stream), "memset");

  const int n_tokens = static_cast<int>(tokens), n_dim = static_cast<int>(dim);
  const FeatureData x = feature_data(features, device, "greedy_residual_select");
  const ks::Element element = x.element;
  const int64_t* len = lengths.const_data_ptr<int64_t>();
  const float* gate_ptr = gate.has_value() ? gate->const_data_ptr<float>() : nullptr;
  const int64_t* seed_ptr = seed.has_value() ? seed->const_data_ptr<int64_t>() : nullptr;

  // Initial energies ||x_i||^2 of every item (0 for padding).
  Tensor initial = torch::stable::new_empty(features, {batch, tokens}, ScalarType::Float);
  float* initial_ptr = initial.mutable_data_ptr<float>();
  {
    const int64_t rows = batch * tokens;
    const int64_t blocks = ks::row_blocks(rows);
    STD_TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), "mrprune: B * N too large");
    launch_squared_norms(element, x.data, len, rows, n_tokens, n_dim, initial_ptr, stream);
    check_launch("row_norm_kernel launch");
  }

  // Device limits, then the plan (form, chunking, workspaces; kernels/greedy_residual_select.cuh).
  int sms = 0, smem_optin = 0, cooperative = 0;
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "device query");
  check_cuda(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device), "device query");
  check_cuda(cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device), "device query");
  STD_TORCH_CHECK(cooperative != 0, "mrprune: greedy_residual_select needs a GPU with cooperative launch support");
  size_t free_bytes = 0, total_bytes = 0;
  check_cuda(cudaMemGetInfo(&free_bytes, &total_bytes), "cudaMemGetInfo");
  const int64_t max_gram = std::max<int64_t>(kg::kMaxGramBytes, static_cast<int64_t>(free_bytes / 4));
  const kg::Plan plan = kg::plan(batch, tokens, k, parse_form(algorithm), sms, kg::kWorkspaceBytes,
                                 element != ks::Element::kFloat32, max_gram);
  void* kernel = ks::with_element(element, [&](auto* tag) {
    return select_kernel<std::remove_pointer_t<decltype(tag)>>(plan.use_gram);
  });
  cudaFuncAttributes attributes{};
  check_cuda(cudaFuncGetAttributes(&attributes, kernel), "cudaFuncGetAttributes");
  const int64_t dynamic_max = static_cast<int64_t>(smem_optin) - static_cast<int64_t>(attributes.sharedSizeBytes);
  STD_TORCH_CHECK(plan.pivot_bytes <= dynamic_max, "mrprune: greedy_residual_select on CUDA supports min(k, N) <= ",
                  dynamic_max / static_cast<int64_t>(sizeof(float)), " on this GPU, got ", plan.rank_cap);

  const int64_t chunk = plan.chunk, ldf = plan.ldf;
  const bool use_gram = plan.use_gram;
  Tensor gram_ws, factor_ws, energy_ws, picked_ws, slots_ws;
  if (use_gram) gram_ws = torch::stable::new_empty(features, {chunk, tokens, tokens}, ScalarType::Float);
  factor_ws = torch::stable::new_empty(features, {chunk, tokens, ldf}, ScalarType::Float);
  energy_ws = torch::stable::new_empty(features, {chunk, tokens}, ScalarType::Float);
  picked_ws = torch::stable::new_empty(features, {chunk, tokens}, ScalarType::Byte);
  slots_ws = torch::stable::new_empty(features, {plan.slot_ints}, ScalarType::Int);

  const bool vec_features = x.vec(dim);  // float4 loads of 4 float32 or 8 half-precision features
  const int64_t gram_tiles = ks::gram_tiles(tokens);
  STD_TORCH_CHECK(gram_tiles <= 65535, "mrprune: N too large for the Gram grid");

  for (int64_t b0 = 0; b0 < batch; b0 += chunk) {
    const int64_t items = std::min(chunk, batch - b0);
    const kg::ChunkPlan part = kg::plan_chunk(plan, n_tokens, items, dynamic_max);
    const int blocks_per_item = part.blocks_per_item;
    const int64_t dynamic_bytes = part.dynamic_bytes;
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(dynamic_bytes)),
               "cudaFuncSetAttribute");
    int occupancy = 0;
    check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occupancy, kernel, kg::kSelectThreads,
                                                             static_cast<size_t>(dynamic_bytes)),
               "occupancy query");
    STD_TORCH_CHECK(occupancy >= 1 && items * blocks_per_item <= static_cast<int64_t>(occupancy) * sms,
                    "mrprune: greedy_residual_select cannot make its blocks co-resident on this GPU");

    const char* x_chunk = x.item(b0, tokens, dim);
    const int64_t* len_chunk = len + b0;
    float* gram_ptr = nullptr;
    if (use_gram) {
      gram_ptr = gram_ws.mutable_data_ptr<float>();
      const dim3 grid(static_cast<unsigned>(gram_tiles), static_cast<unsigned>(gram_tiles),
                      static_cast<unsigned>(items));
      launch_gram(element, vec_features, grid, x_chunk, len_chunk, n_tokens, n_dim, nullptr, gram_ptr, stream);
      check_launch("gram kernel launch");
    }
    float* factor_ptr = factor_ws.mutable_data_ptr<float>();
    uint8_t* picked_ptr = picked_ws.mutable_data_ptr<uint8_t>();
    auto* slots_ptr = reinterpret_cast<ks::Slot*>(slots_ws.mutable_data_ptr<int32_t>());
    check_cuda(cudaMemsetAsync(factor_ptr, 0, static_cast<size_t>(items * tokens * ldf) * sizeof(float), stream),
               "memset");
    check_cuda(cudaMemsetAsync(picked_ptr, 0, static_cast<size_t>(items * tokens), stream), "memset");
    check_cuda(cudaMemsetAsync(slots_ptr, 0, static_cast<size_t>(2 * items * blocks_per_item) * sizeof(ks::Slot),
                               stream),
               "memset");

    kg::Params params{};
    params.x = x_chunk;
    params.gram = gram_ptr;
    params.initial = initial_ptr + b0 * tokens;
    params.gate = gate_ptr != nullptr ? gate_ptr + b0 * tokens : nullptr;
    params.seed = seed_ptr != nullptr ? seed_ptr + b0 : nullptr;
    params.lengths = len_chunk;
    params.energy = energy_ws.mutable_data_ptr<float>();
    params.picked = picked_ptr;
    params.factor = factor_ptr;
    params.slots = slots_ptr;
    params.out_indices = out_indices + b0 * k;
    params.out_energies = out_energies + b0 * k;
    params.n_tokens = n_tokens;
    params.dim = n_dim;
    params.k = static_cast<int>(k);
    params.ldf = static_cast<int>(ldf);
    params.blocks_per_item = blocks_per_item;
    params.cache_cols = static_cast<int>(part.cache_cols);
    params.cache_ld = static_cast<int>(part.cache_ld);
    params.tol = static_cast<float>(exhaustion_tol);
    params.vec_x = vec_features && element == ks::Element::kFloat32;
    void* args[] = {&params};
    check_cuda(cudaLaunchCooperativeKernel(kernel, dim3(static_cast<unsigned>(items * blocks_per_item)),
                                           dim3(kg::kSelectThreads), args, static_cast<size_t>(dynamic_bytes), stream),
               "greedy_select_kernel cooperative launch");
    check_launch("greedy_select_kernel launch");
  }
  return {indices, energies};
}

}  // namespace mrprune::cuda

STABLE_TORCH_LIBRARY_IMPL(mrprune, CUDA, m) {
  m.impl("_greedy_residual_select_cuda", TORCH_BOX(&mrprune::cuda::greedy_residual_select_cuda));
}
