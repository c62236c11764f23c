// Shared pieces of the CPU token-merging kernels (bipartite_merge, assign_merge, knn_weighted_merge,
// density_peak_merge): rows read and written in the tensor's own dtype (float32, bfloat16, float16; the router sends
// float64 to the reference), float32 accumulation, cosine blocks from the Gram tiles of gram.h, and the even/odd best
// match that ToMe's merge shares with VisPruner's de-duplication.
#pragma once

#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <cstring>

#include "mrprune/cpu/gram.h"

namespace mrprune::cpu {

// out[c] = (float) row[c] for c < d.
inline void load_row(const void* row, dots::Elem elem, int64_t d, float* out) {
  for (int64_t c = 0; c < d; ++c) out[c] = dots::load(row, elem, c);
}

// acc[c] += w * row[c].
inline void axpy_row(float w, const void* row, dots::Elem elem, int64_t d, float* acc) {
  for (int64_t c = 0; c < d; ++c) acc[c] += w * dots::load(row, elem, c);
}

// row[c] = value[c] rounded to the row's dtype (round to nearest even).
inline void store_row(const float* value, dots::Elem elem, int64_t d, void* row) {
  switch (elem) {
    case dots::Elem::kFloat32:
      std::memcpy(row, value, static_cast<size_t>(d) * sizeof(float));
      return;
    case dots::Elem::kBFloat16:
      for (int64_t c = 0; c < d; ++c) static_cast<torch::headeronly::BFloat16*>(row)[c] = value[c];
      return;
    default:
      for (int64_t c = 0; c < d; ++c) static_cast<torch::headeronly::Half*>(row)[c] = value[c];
  }
}

// Element pointer of row i of item b of a [B, N, D] tensor in its own dtype.
inline char* item_row_ptr(const Tensor& t, int64_t b, int64_t i) {
  const int64_t size = dots::elem_size(elem_of(t.scalar_type()));
  return static_cast<char*>(const_cast<void*>(t.const_data_ptr())) + (b * t.size(1) + i) * t.size(2) * size;
}

// The rows `rows[0..count)` of x (which must not be indexed itself) as a RowMatrix the Gram tiles can read, without
// copying them; `rows` must outlive it.
inline RowMatrix select_rows(const RowMatrix& x, const int64_t* rows, int64_t count) {
  return RowMatrix{x.data, x.elem, count, x.d, x.stride, rows};
}

// For every row i of a, the first column j of b maximising cos(a_i, b_j) = (a_i . b_j) * (inv_a[i] * inv_b[j]):
// best[i] (-inf when b is empty) and arg[i] (0 then). Each row tile is visited by one thread in increasing j, so a
// strict comparison keeps the first maximum.
inline void best_cosine_match(const RowMatrix& a, const float* inv_a, const RowMatrix& b, const float* inv_b,
                              float* best, int64_t* arg) {
  std::fill(best, best + a.rows, -std::numeric_limits<float>::infinity());
  std::fill(arg, arg + a.rows, int64_t{0});
  if (b.rows == 0 || a.rows == 0) return;
  visit_cross_tiles(a, b, [&](int64_t i0, int64_t m, int64_t j0, int64_t n, const float* raw, int64_t ld) {
    for (int64_t r = 0; r < m; ++r) {
      const int64_t i = i0 + r;
      float value = best[i];
      int64_t where = arg[i];
      for (int64_t c = 0; c < n; ++c) {
        const float cos = raw[r * ld + c] * (inv_a[i] * inv_b[j0 + c]);
        if (cos > value) value = cos, where = j0 + c;
      }
      best[i] = value;
      arg[i] = where;
    }
  });
}

// The even/odd matching of ToMe and VisPruner for the first n rows of x (inv: their inverse norms): every even
// position 2a's best odd partner 2 * arg[a] + 1 and its cosine best[a] (a < (n + 1) / 2).
inline void even_odd_best_match(const RowMatrix& x, const float* inv, int64_t n, float* best, int64_t* arg) {
  const int64_t evens = (n + 1) / 2, odds = n / 2, size = dots::elem_size(x.elem);
  const RowMatrix a{x.data, x.elem, evens, x.d, 2 * x.stride};
  const RowMatrix b{static_cast<const char*>(x.data) + x.stride * size, x.elem, odds, x.d, 2 * x.stride};
  std::vector<float> inv_a(static_cast<size_t>(evens)), inv_b(static_cast<size_t>(odds));
  for (int64_t i = 0; i < n; ++i) (i % 2 == 0 ? inv_a[i / 2] : inv_b[i / 2]) = inv[i];
  best_cosine_match(a, inv_a.data(), b, inv_b.data(), best, arg);
}

}  // namespace mrprune::cpu
