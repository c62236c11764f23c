// Shared pieces of the C++ CPU kernels: argument checks, BLAS through the dispatcher, a fixed-order dot product, row
// normalisation and the BLAS symmetric Gram of float32 rows (bipartite_dedup's float32 path; the other Grams: gram.h),
// and the thresholded softmax row of the official MR-Pruner / G-Prune graph.
//
// Everything is written against the LibTorch stable ABI (torch/csrc/stable), so the extension does not depend on
// libtorch's C++ ABI and the same headers serve the CUDA files. The Python router (mrprune/_library.py) validates
// every argument and hands these kernels canonical inputs (contiguous float32 values, int64 indices); the checks
// here only guard that contract.
#pragma once

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <memory>
#include <vector>

namespace mrprune::cpu {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

// The official code's fill for non-edges and its "is this logit zero" test (research/algorithms.md §2.3).
constexpr float kEdgeFillLogit = -5000.0f;
constexpr float kZeroLogitTol = 1e-6f;
constexpr float kNormEps = 1e-12f;

// An uninitialised float workspace: large buffers are written before they are read, so the zero-fill a
// std::vector would do is a wasted pass over memory.
using Workspace = std::unique_ptr<float[]>;
inline Workspace workspace(int64_t size) { return Workspace(new float[static_cast<size_t>(std::max<int64_t>(size, 1))]); }

inline void check_tensor(const Tensor& t, const char* name, int64_t dim, ScalarType dtype) {
  STD_TORCH_CHECK(t.is_cpu(), "mrprune: ", name, " must be a CPU tensor");
  STD_TORCH_CHECK(t.dim() == dim, "mrprune: ", name, " must be ", dim, "-D");
  STD_TORCH_CHECK(t.scalar_type() == dtype, "mrprune: ", name, " has the wrong dtype (the router converts it)");
  STD_TORCH_CHECK(t.is_contiguous(), "mrprune: ", name, " must be contiguous");
}

inline void check_sizes(const Tensor& t, const char* name, std::initializer_list<int64_t> sizes) {
  int64_t dim = 0;
  for (int64_t size : sizes) {
    STD_TORCH_CHECK(t.size(dim) == size, "mrprune: ", name, " has size ", t.size(dim), " at dim ", dim, ", expected ",
                    size);
    ++dim;
  }
}

// lengths must be int64 [batch] with values in [0, tokens]: the kernels index rows by them.
inline void check_lengths(const Tensor& lengths, const char* name, int64_t batch, int64_t tokens) {
  check_tensor(lengths, name, 1, ScalarType::Long);
  STD_TORCH_CHECK(lengths.size(0) == batch, "mrprune: ", name, " must have one entry per batch item");
  const int64_t* len = lengths.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    STD_TORCH_CHECK(0 <= len[b] && len[b] <= tokens, "mrprune: ", name, " must lie in [0, N]");
  }
}

// A no-copy [rows, cols] view of a float buffer with the given strides (a transposed view is just swapped strides).
inline Tensor float_view(const float* data, int64_t rows, int64_t cols, int64_t row_stride, int64_t col_stride) {
  return torch::stable::from_blob(const_cast<float*>(data), {rows, cols}, {row_stride, col_stride},
                                  torch::stable::Device(torch::headeronly::DeviceType::CPU), ScalarType::Float);
}

// out = a @ b through aten::mm.out, i.e. the BLAS torch was built with (multi-threaded, any strides).
inline void matmul_into(const Tensor& a, const Tensor& b, const Tensor& out) {
  std::array<StableIValue, 3> stack{torch::stable::detail::from(a), torch::stable::detail::from(b),
                                    torch::stable::detail::from(out)};
  STABLE_TORCH_ERROR_CODE_CHECK(torch_call_dispatcher("aten::mm", "out", stack.data(), TORCH_ABI_VERSION));
}

// a . b in a fixed summation order (8 interleaved partial sums, which the compiler vectorises): the result does not
// depend on alignment or thread count.
inline float dot(const float* a, const float* b, int64_t d) {
  float partial[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t c = 0;
  for (; c + 8 <= d; c += 8) {
    for (int lane = 0; lane < 8; ++lane) partial[lane] += a[c + lane] * b[c + lane];
  }
  for (; c < d; ++c) partial[c % 8] += a[c] * b[c];
  return ((partial[0] + partial[1]) + (partial[2] + partial[3])) + ((partial[4] + partial[5]) + (partial[6] + partial[7]));
}

// Rows of x [n, d] scaled to unit norm (norm floored at 1e-12, as F.normalize); norms[i] = ||x_i|| if requested.
inline void normalize_rows(const float* x, int64_t n, int64_t d, float* out, float* norms) {
  torch::stable::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* row = x + i * d;
      const float norm = std::sqrt(dot(row, row, d));
      if (norms != nullptr) norms[i] = norm;
      const float scale = 1.f / std::max(norm, kNormEps);
      for (int64_t c = 0; c < d; ++c) out[i * d + c] = row[c] * scale;
    }
  });
}

// S[:n, :n] (row stride lds) = x x^T for x [n, d]. Only the block upper triangle is multiplied (one wide GEMM per
// row block), the rest is mirrored: half the flops of a plain GEMM, and S comes out exactly symmetric.
inline void symmetric_gram(const float* x, int64_t n, int64_t d, float* s, int64_t lds) {
  constexpr int64_t kBlock = 256;
  for (int64_t r0 = 0; r0 < n; r0 += kBlock) {
    const int64_t rows = std::min(kBlock, n - r0);
    const int64_t cols = n - r0;
    matmul_into(float_view(x + r0 * d, rows, d, d, 1), float_view(x + r0 * d, d, cols, 1, d),
                float_view(s + r0 * lds + r0, rows, cols, lds, 1));
  }
  // Mirror the strict lower triangle from the upper one (even inside diagonal blocks, so S is bitwise symmetric),
  // tile by tile so the column reads stay in cache.
  constexpr int64_t kTile = 64;
  const int64_t tiles = (n + kTile - 1) / kTile;
  torch::stable::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t ti = begin; ti < end; ++ti) {
      const int64_t i0 = ti * kTile, i1 = std::min(n, i0 + kTile);
      for (int64_t j0 = 0; j0 < i1; j0 += kTile) {
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t j1 = std::min(i, j0 + kTile);
          for (int64_t j = j0; j < j1; ++j) s[i * lds + j] = s[j * lds + i];
        }
      }
    }
  });
}

// The edge rule of the official code for one similarity value: it zeroes S < threshold, divides by the
// temperature and treats |logit| < 1e-6 as "no edge" (the -5000 fill).
inline bool is_edge(float similarity, float threshold, float temperature, float* logit) {
  if (!(similarity >= threshold)) return false;
  *logit = similarity / temperature;
  return std::fabs(*logit) >= kZeroLogitTol;
}

// Statistics of the thresholded softmax of one similarity row of length m, where non-edges keep the official
// logit -5000 (so a row without edges is uniform, and a row whose edge logits all lie far below -5000 puts its
// mass on the non-edges, exactly as the official softmax does).
struct EdgeRowStats {
  float max_logit;
  float denominator;
  float fill;     // exp(-5000 - max_logit): the unnormalised probability of every non-edge
  int64_t edges;  // the degree (m when there is no edge)

  float degree(int64_t m) const { return static_cast<float>(edges > 0 ? edges : m); }
};

// The statistics of a row of m entries whose edge logits each_logit(fn) visits (fn(z) once per edge, in column
// order, the same on every call): one definition for dense similarity rows and for edge lists alike.
template <class EachLogit>
inline EdgeRowStats edge_stats(int64_t m, const EachLogit& each_logit) {
  EdgeRowStats stats{-std::numeric_limits<float>::infinity(), 0.f, 0.f, 0};
  each_logit([&](float z) {
    stats.max_logit = std::max(stats.max_logit, z);
    ++stats.edges;
  });
  const int64_t non_edges = m - stats.edges;
  if (non_edges > 0) stats.max_logit = std::max(stats.max_logit, kEdgeFillLogit);
  stats.fill = non_edges > 0 ? std::exp(kEdgeFillLogit - stats.max_logit) : 0.f;
  stats.denominator = static_cast<float>(non_edges) * stats.fill;
  if (stats.edges > 0) each_logit([&](float z) { stats.denominator += std::exp(z - stats.max_logit); });
  return stats;
}

inline EdgeRowStats edge_row_stats(const float* similarity, int64_t m, float threshold, float temperature) {
  return edge_stats(m, [&](const auto& fn) {
    float z;
    for (int64_t j = 0; j < m; ++j) {
      if (is_edge(similarity[j], threshold, temperature, &z)) fn(z);
    }
  });
}

// P row = thresholded softmax of a similarity row (in place is fine); returns the degree (edges, or m if none).
inline float edge_softmax_row(const float* similarity, int64_t m, float threshold, float temperature, float* probs) {
  const EdgeRowStats stats = edge_row_stats(similarity, m, threshold, temperature);
  float z;
  for (int64_t j = 0; j < m; ++j) {
    probs[j] = (is_edge(similarity[j], threshold, temperature, &z) ? std::exp(z - stats.max_logit) : stats.fill) /
               stats.denominator;
  }
  return stats.degree(m);
}

// Thresholded softmax of every row of S[:n, :n] (row stride lds), in place; degree[i] as edge_softmax_row.
inline void edge_softmax_rows(float* s, int64_t n, int64_t lds, float threshold, float temperature, float* degree) {
  torch::stable::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) degree[i] = edge_softmax_row(s + i * lds, n, threshold, temperature, s + i * lds);
  });
}

// out[:n] = (w^T P^t) / degree for P[:n, :n] with row stride ldp, by t vector-matrix products.
inline void propagate(const float* p, int64_t n, int64_t ldp, const float* weights, const float* degree,
                      int64_t iterations, float* out) {
  if (n == 0) return;
  std::vector<float> mass(weights, weights + n), next(n);
  const Tensor graph = float_view(p, n, n, ldp, 1);
  for (int64_t step = 0; step < iterations; ++step) {
    matmul_into(float_view(mass.data(), 1, n, n, 1), graph, float_view(next.data(), 1, n, n, 1));
    mass.swap(next);
  }
  for (int64_t j = 0; j < n; ++j) out[j] = mass[j] / degree[j];
}

}  // namespace mrprune::cpu
