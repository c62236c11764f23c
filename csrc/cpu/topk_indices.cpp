// topk_indices on the CPU: a partial sort per item (parallel over the batch) with an explicit total order, larger
// score first and the lower index on ties, so the result never depends on the sort implementation.
// Spec: mrprune.reference.topk_indices.
#include "mrprune/cpu/common.h"

#include <numeric>

namespace mrprune::cpu {

Tensor topk_indices_cpu(Tensor scores, Tensor lengths, int64_t k, bool sort_indices) {
  check_tensor(scores, "scores", 2, ScalarType::Float);
  const int64_t batch = scores.size(0), tokens = scores.size(1);
  check_lengths(lengths, "lengths", batch, tokens);
  STD_TORCH_CHECK(0 <= k && k <= tokens, "mrprune: k must lie in [0, N]");
  Tensor out = torch::stable::new_empty(scores, {batch, k}, ScalarType::Long);
  const float* s = scores.const_data_ptr<float>();
  const int64_t* len = lengths.const_data_ptr<int64_t>();
  int64_t* indices = out.mutable_data_ptr<int64_t>();
  torch::stable::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> order;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n = len[b], take = std::min(k, n);
      const float* row = s + b * tokens;
      order.resize(n);
      std::iota(order.begin(), order.end(), int64_t{0});
      std::partial_sort(order.begin(), order.begin() + take, order.end(),
                        [row](int64_t a, int64_t c) { return row[a] > row[c] || (row[a] == row[c] && a < c); });
      if (sort_indices) std::sort(order.begin(), order.begin() + take);
      int64_t* dst = indices + b * k;
      std::copy(order.begin(), order.begin() + take, dst);
      std::fill(dst + take, dst + k, int64_t{-1});
    }
  });
  return out;
}

}  // namespace mrprune::cpu

STABLE_TORCH_LIBRARY_IMPL(mrprune, CPU, m) { m.impl("_topk_indices_cpu", TORCH_BOX(&mrprune::cpu::topk_indices_cpu)); }
