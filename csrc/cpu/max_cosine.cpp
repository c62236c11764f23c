// max_cosine on the CPU: one BLAS GEMM of unit queries against unit keys per item, then a row max.
// Spec: mrprune.reference.max_cosine.
#include "mrprune/cpu/common.h"

namespace mrprune::cpu {

Tensor max_cosine_cpu(Tensor queries, Tensor query_lengths, Tensor keys, Tensor key_lengths) {
  check_tensor(queries, "queries", 3, ScalarType::Float);
  check_tensor(keys, "keys", 3, ScalarType::Float);
  const int64_t batch = queries.size(0), max_queries = queries.size(1), dim = queries.size(2);
  const int64_t max_keys = keys.size(1);
  check_lengths(query_lengths, "query_lengths", batch, max_queries);
  check_lengths(key_lengths, "key_lengths", batch, max_keys);
  check_sizes(keys, "keys", {batch, max_keys, dim});
  Tensor rho = torch::stable::new_zeros(queries, {batch, max_queries});
  std::vector<float> query_unit(static_cast<size_t>(max_queries * dim)), key_unit(static_cast<size_t>(max_keys * dim)),
      similarity(static_cast<size_t>(max_queries * max_keys));
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t m = query_lengths.const_data_ptr<int64_t>()[b], n = key_lengths.const_data_ptr<int64_t>()[b];
    float* out = rho.mutable_data_ptr<float>() + b * max_queries;
    if (n == 0) {  // the max over no keys
      std::fill(out, out + m, -std::numeric_limits<float>::infinity());
      continue;
    }
    if (m == 0) continue;
    normalize_rows(queries.const_data_ptr<float>() + b * max_queries * dim, m, dim, query_unit.data(), nullptr);
    normalize_rows(keys.const_data_ptr<float>() + b * max_keys * dim, n, dim, key_unit.data(), nullptr);
    matmul_into(float_view(query_unit.data(), m, dim, dim, 1), float_view(key_unit.data(), dim, n, 1, dim),
                float_view(similarity.data(), m, n, n, 1));
    for (int64_t i = 0; i < m; ++i) {
      const float* row = similarity.data() + i * n;
      out[i] = *std::max_element(row, row + n);
    }
  }
  return rho;
}

}  // namespace mrprune::cpu

STABLE_TORCH_LIBRARY_IMPL(mrprune, CPU, m) { m.impl("_max_cosine_cpu", TORCH_BOX(&mrprune::cpu::max_cosine_cpu)); }
