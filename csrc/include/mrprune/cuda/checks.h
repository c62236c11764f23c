// Host-side argument and error checks shared by the CUDA launchers (stable ABI only, so plain nvcc compiles them).
// The Python router validates every argument first; these only guard the launchers' contract.
#pragma once

#include <cuda_runtime.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <cstdint>

namespace mrprune::cuda {

inline void check_tensor(const torch::stable::Tensor& t, const char* name, int64_t dim,
                         torch::headeronly::ScalarType dtype, int32_t device) {
  STD_TORCH_CHECK(t.is_cuda(), "mrprune: ", name, " must be a CUDA tensor");
  STD_TORCH_CHECK(t.get_device_index() == device, "mrprune: ", name, " must be on the same CUDA device as the other inputs");
  STD_TORCH_CHECK(t.dim() == dim, "mrprune: ", name, " must be ", dim, "-D");
  STD_TORCH_CHECK(t.scalar_type() == dtype, "mrprune: ", name, " has the wrong dtype (the router converts it)");
  STD_TORCH_CHECK(t.is_contiguous(), "mrprune: ", name, " must be contiguous");
}

// A CUDA runtime call of `op` that must succeed.
inline void check_cuda(cudaError_t error, const char* op, const char* what) {
  STD_TORCH_CHECK(error == cudaSuccess, "mrprune: ", op, " ", what, " failed: ", cudaGetErrorString(error));
}

}  // namespace mrprune::cuda
