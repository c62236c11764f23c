// max_cosine on the CPU: one BLAS GEMM of the raw queries against the unit keys per item, then each row's max
// divided by the query's norm (the same cosine as normalising first, without writing a normalised copy of the
// queries, which are the large side: all of an image's visual tokens against a few text tokens).
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
  Workspace key_unit = workspace(max_keys * dim), similarity = workspace(max_queries * max_keys);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t m = query_lengths.const_data_ptr<int64_t>()[b], n = key_lengths.const_data_ptr<int64_t>()[b];
    float* out = rho.mutable_data_ptr<float>() + b * max_queries;
    if (n == 0) {  // the max over no keys
      std::fill(out, out + m, -std::numeric_limits<float>::infinity());
      continue;
    }
    if (m == 0) continue;
    const float* query = queries.const_data_ptr<float>() + b * max_queries * dim;
    normalize_rows(keys.const_data_ptr<float>() + b * max_keys * dim, n, dim, key_unit.get(), nullptr);
    matmul_into(float_view(query, m, dim, dim, 1), float_view(key_unit.get(), dim, n, 1, dim),
                float_view(similarity.get(), m, n, n, 1));
    torch::stable::parallel_for(0, m, 64, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const float* row = similarity.get() + i * n;
        const float norm = std::sqrt(dot(query + i * dim, query + i * dim, dim));
        out[i] = *std::max_element(row, row + n) / std::max(norm, kNormEps);
      }
    });
  }
  return rho;
}

}  // namespace mrprune::cpu

STABLE_TORCH_LIBRARY_IMPL(mrprune, CPU, m) { m.impl("_max_cosine_cpu", TORCH_BOX(&mrprune::cpu::max_cosine_cpu)); }
