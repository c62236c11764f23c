// Host-side prologue shared by the one-block-per-item selection launchers over a cosine Gram (diversity_select,
// coverage_select, bipartite_dedup): the common argument checks, the device guard, the [B, k] int64 output filled
// with -1 on the current stream, the early return for an empty output, and the dynamic shared-memory budget of the
// selection kernel that the launch plan (kernels/*.cuh) is sized against. Stable ABI only, like checks.h.
#pragma once

#include <cuda_runtime.h>
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <cstddef>
#include <cstdint>
#include <limits>

#include "mrprune/cuda/checks.h"

namespace mrprune::cuda {

// The sizes of checked selection inputs: features [B, N, D], lengths [B] int64, all on `device`.
struct SelectionShape {
  int32_t device;
  int64_t batch, tokens, dim;
};

// The checks every selection launcher makes: features [B, N, D] float32, float16 or bfloat16 and lengths [B] int64,
// contiguous, on one CUDA device; 0 <= k <= N; N < 2^30 and D < 2^31 (the kernels index with int). `op` names the op
// in the errors.
inline SelectionShape check_selection_inputs(const torch::stable::Tensor& features,
                                             const torch::stable::Tensor& lengths, int64_t k, const char* op) {
  using torch::headeronly::ScalarType;
  STD_TORCH_CHECK(features.is_cuda(), "mrprune: ", op, ": features must be a CUDA tensor");
  const int32_t device = features.get_device_index();
  const ScalarType dtype = features.scalar_type();
  const bool half = dtype == ScalarType::Half || dtype == ScalarType::BFloat16;
  check_tensor(features, "features", 3, half ? dtype : ScalarType::Float, device);
  check_tensor(lengths, "lengths", 1, ScalarType::Long, device);
  const SelectionShape shape{device, features.size(0), features.size(1), features.size(2)};
  STD_TORCH_CHECK(lengths.size(0) == shape.batch, "mrprune: ", op, ": lengths must have shape [B]");
  STD_TORCH_CHECK(0 <= k && k <= shape.tokens, "mrprune: ", op, ": k must lie in [0, N]");
  STD_TORCH_CHECK(shape.tokens <= std::numeric_limits<int>::max() / 2 && shape.dim <= std::numeric_limits<int>::max(),
                  "mrprune: ", op, " supports N < 2^30 and D < 2^31");
  return shape;
}

// The launcher's device and output: holds the device guard for its lifetime (construct it after the op's own checks,
// keep it alive until the last launch), allocates indices [B, k] int64 and, unless empty(), fills it with -1 on the
// current CUDA stream (slots a kernel leaves unwritten, past an item's length, read as padding).
class SelectionOutput {
 public:
  SelectionOutput(const torch::stable::Tensor& features, const SelectionShape& shape, int64_t k, const char* op)
      : guard_(shape.device),
        indices_(torch::stable::new_empty(features, {shape.batch, k}, torch::headeronly::ScalarType::Long)),
        empty_(shape.batch == 0 || k == 0) {
    if (empty_) return;  // nothing to fill, no stream needed
    void* stream_handle = nullptr;
    STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(shape.device, &stream_handle));
    stream_ = static_cast<cudaStream_t>(stream_handle);
    data_ = indices_.mutable_data_ptr<int64_t>();
    check_cuda(cudaMemsetAsync(data_, 0xff, static_cast<size_t>(shape.batch * k) * sizeof(int64_t), stream_), op,
               "memset");
  }

  // No launch needed: B == 0 or k == 0 (N == 0 implies k == 0).
  bool empty() const { return empty_; }
  // [B, k] int64, the launcher's result.
  const torch::stable::Tensor& indices() const { return indices_; }
  // The device's current stream; null when empty().
  cudaStream_t stream() const { return stream_; }
  // indices' data; null when empty().
  int64_t* data() const { return data_; }

 private:
  torch::stable::accelerator::DeviceGuard guard_;  // first: the device is set before the output is allocated
  torch::stable::Tensor indices_;
  bool empty_;
  cudaStream_t stream_ = nullptr;
  int64_t* data_ = nullptr;
};

// The dynamic shared memory one block of `kernel` may request on `device`: the opt-in per-block limit less the
// kernel's static shared memory (the budget the launch plans take).
template <typename Kernel>
int64_t dynamic_shared_budget(Kernel* kernel, int32_t device, const char* op) {
  int smem_optin = 0;
  check_cuda(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device), op,
             "device query");
  cudaFuncAttributes attributes{};
  check_cuda(cudaFuncGetAttributes(&attributes, reinterpret_cast<const void*>(kernel)), op, "cudaFuncGetAttributes");
  return static_cast<int64_t>(smem_optin) - static_cast<int64_t>(attributes.sharedSizeBytes);
}

// Lets `kernel` be launched with `bytes` of dynamic shared memory (needed above the 48 KiB default).
template <typename Kernel>
void allow_dynamic_shared(Kernel* kernel, int64_t bytes, const char* op) {
  check_cuda(cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(bytes)),
             op, "cudaFuncSetAttribute");
}

}  // namespace mrprune::cuda
