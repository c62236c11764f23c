// max_cosine on the CPU: raw query x key dot products from gram.h tiles (stored precision, float32 accumulation),
// scaled by the float32 inverse norms, and each row's max (no normalised copy of either side is written).
// Spec: mrprune.reference.max_cosine.
#include "mrprune/cpu/gram.h"

namespace mrprune::cpu {

Tensor max_cosine_cpu(Tensor queries, Tensor query_lengths, Tensor keys, Tensor key_lengths) {
  check_features(queries, "queries");
  check_features(keys, "keys");
  STD_TORCH_CHECK(queries.scalar_type() == keys.scalar_type(), "mrprune: queries and keys must share a dtype");
  const int64_t batch = queries.size(0), max_queries = queries.size(1), dim = queries.size(2);
  const int64_t max_keys = keys.size(1);
  check_lengths(query_lengths, "query_lengths", batch, max_queries);
  check_lengths(key_lengths, "key_lengths", batch, max_keys);
  check_sizes(keys, "keys", {batch, max_keys, dim});
  Tensor rho = torch::stable::new_zeros(queries, {batch, max_queries}, ScalarType::Float);
  std::vector<float> key_inv(max_keys), query_inv(max_queries);
  Workspace similarity = workspace(max_queries * max_keys);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t m = query_lengths.const_data_ptr<int64_t>()[b], n = key_lengths.const_data_ptr<int64_t>()[b];
    float* out = rho.mutable_data_ptr<float>() + b * max_queries;
    if (n == 0) {  // the max over no keys
      std::fill(out, out + m, -std::numeric_limits<float>::infinity());
      continue;
    }
    if (m == 0) continue;
    const RowMatrix query_rows = item_rows(queries, b, m), key_rows = item_rows(keys, b, n);
    row_norms(query_rows, nullptr, query_inv.data());
    row_norms(key_rows, nullptr, key_inv.data());
    visit_cross_blocks(query_rows, key_rows,
                      [&](int64_t i0, int64_t rows, int64_t j0, int64_t cols, const float* raw, int64_t ld) {
                        for (int64_t r = 0; r < rows; ++r) {
                          for (int64_t c = 0; c < cols; ++c) {
                            similarity[(i0 + r) * n + j0 + c] = raw[r * ld + c] * (query_inv[i0 + r] * key_inv[j0 + c]);
                          }
                        }
                      });
    torch::stable::parallel_for(0, m, 64, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) out[i] = *std::max_element(similarity.get() + i * n, similarity.get() + (i + 1) * n);
    });
  }
  return rho;
}

}  // namespace mrprune::cpu

STABLE_TORCH_LIBRARY_IMPL(mrprune, CPU, m) { m.impl("_max_cosine_cpu", TORCH_BOX(&mrprune::cpu::max_cosine_cpu)); }
