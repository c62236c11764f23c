// Host launches (nvcc only) shared by the selection launchers, which take float32, float16 or bfloat16 features: the
// features' element type (feature_data), squared row norms, and a chunk's symmetric Gram (the FP32 FFMA gram_kernel of
// kernels/selection.cuh for float32, the tensor-core gram_mma_kernel of kernels/gram_mma.cuh for half precision).
#pragma once

#include <cuda_runtime.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <cstdint>
#include <type_traits>

#include "mrprune/cuda/checks.h"
#include "mrprune/kernels/gram_mma.cuh"
#include "mrprune/kernels/selection.cuh"

namespace mrprune::cuda {

// The features of a selection launcher: element type, bytes per element, data. Half precision needs WMMA with bf16
// (sm_80, checked here); the Python router sends float32 to older GPUs.
struct FeatureData {
  kernels::selection::Element element;
  int64_t element_bytes;
  const char* data;
  bool half() const { return element != kernels::selection::Element::kFloat32; }
  // Item b0's rows of a [B, N, D] tensor.
  const char* item(int64_t b0, int64_t tokens, int64_t dim) const { return data + b0 * tokens * dim * element_bytes; }
  // 16-byte loads: whole 16-byte chunks per row, 16-byte aligned rows.
  bool vec(int64_t dim) const {
    return dim % (16 / element_bytes) == 0 && reinterpret_cast<uintptr_t>(data) % 16 == 0;
  }
};

inline FeatureData feature_data(const torch::stable::Tensor& features, int32_t device, const char* op) {
  namespace ks = kernels::selection;
  using torch::headeronly::ScalarType;
  const ScalarType dtype = features.scalar_type();
  const ks::Element element = dtype == ScalarType::Half       ? ks::Element::kFloat16
                              : dtype == ScalarType::BFloat16 ? ks::Element::kBFloat16
                                                              : ks::Element::kFloat32;
  if (element != ks::Element::kFloat32) {
    int major = 0;
    check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), op, "device query");
    STD_TORCH_CHECK(major >= 8, "mrprune: ", op, " takes float16/bfloat16 features on sm_80 or newer GPUs only");
  }
  return FeatureData{element, element == ks::Element::kFloat32 ? 4 : 2,
                     static_cast<const char*>(features.const_data_ptr())};
}

// out[r] = ||x_r||^2 for the `rows` rows [items * N] of x (features of `element`; 0 for padding).
inline void launch_squared_norms(kernels::selection::Element element, const void* x, const int64_t* lengths,
                                 int64_t rows, int n_tokens, int n_dim, float* out, cudaStream_t stream) {
  namespace ks = kernels::selection;
  ks::with_element(element, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    ks::row_norm_kernel<ks::kNormThreads, ks::RowOut::kSquaredNorm, T>
        <<<static_cast<unsigned>(ks::row_blocks(rows)), ks::kNormThreads, 0, stream>>>(
            static_cast<const T*>(x), lengths, rows, n_tokens, n_dim, out, nullptr);
  });
}

// x: the chunk's features [items, N, D] of `element`; grid (T, T, items) with T = gram_tiles(N); vec: 16-byte
// aligned rows of whole 16-byte chunks. scale [items, N] (half precision only; null: the plain Gram). Writes gram
// [items, N, N].
inline void launch_gram(kernels::selection::Element element, bool vec, dim3 grid, const void* x,
                        const int64_t* lengths, int n_tokens, int n_dim, const float* scale, float* gram,
                        cudaStream_t stream) {
  namespace ks = kernels::selection;
  ks::with_element(element, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* features = static_cast<const T*>(x);
    if constexpr (std::is_same_v<T, float>) {
      STD_TORCH_CHECK(scale == nullptr, "mrprune: the float32 Gram takes no scale");
      if (vec) {
        ks::gram_kernel<true><<<grid, ks::kGramThreads, 0, stream>>>(features, lengths, n_tokens, n_dim, gram);
      } else {
        ks::gram_kernel<false><<<grid, ks::kGramThreads, 0, stream>>>(features, lengths, n_tokens, n_dim, gram);
      }
    } else if (vec) {
      ks::gram_mma_kernel<T, true><<<grid, ks::kMmaThreads, 0, stream>>>(features, lengths, n_tokens, n_dim, scale,
                                                                         gram);
    } else {
      ks::gram_mma_kernel<T, false><<<grid, ks::kMmaThreads, 0, stream>>>(features, lengths, n_tokens, n_dim, scale,
                                                                          gram);
    }
  });
}

}  // namespace mrprune::cuda
