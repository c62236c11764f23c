// knn_weighted_merge on the CPU: PruMerge's merge in one call (the official code loops over batch x kept tokens in
// Python). Cosines of the kept tokens to all tokens come from the Gram tiles in the metric's own dtype; each kept row
// takes its k nearest others by a partial sort (cosine descending, position ascending) and sums them weighted, in
// float32, written in x's dtype. Spec: mrprune.reference.knn_weighted_merge.
#include "mrprune/cpu/merge.h"

namespace mrprune::cpu {

std::tuple<Tensor, Tensor> knn_weighted_merge_cpu(Tensor x, Tensor metric, Tensor weights, Tensor lengths, Tensor kept,
                                                  int64_t k) {
  check_features(x, "x");
  check_features(metric, "metric");
  const int64_t batch = x.size(0), tokens = x.size(1), dim = x.size(2);
  check_sizes(metric, "metric", {batch, tokens});
  check_tensor(weights, "weights", 2, ScalarType::Float);
  check_sizes(weights, "weights", {batch, tokens});
  check_lengths(lengths, "lengths", batch, tokens);
  check_tensor(kept, "kept", 2, ScalarType::Long);
  STD_TORCH_CHECK(kept.size(0) == batch, "mrprune: kept must have one row per batch item");
  STD_TORCH_CHECK(0 <= k && k <= tokens, "mrprune: k must lie in [0, N]");
  const int64_t slots = kept.size(1);
  const dots::Elem elem = elem_of(x.scalar_type());
  Tensor merged = torch::stable::new_zeros(x, {batch, slots, dim});
  Tensor neighbors = torch::stable::new_empty(x, {batch, slots, k}, ScalarType::Long);
  int64_t* nb = neighbors.mutable_data_ptr<int64_t>();
  std::fill(nb, nb + batch * slots * k, int64_t{-1});
  const int64_t* len = lengths.const_data_ptr<int64_t>();
  std::vector<int64_t> used, where;
  std::vector<float> inv, inv_k, cos;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t n = len[b];
    const int64_t* kept_row = kept.const_data_ptr<int64_t>() + b * slots;
    used.clear();
    where.clear();
    for (int64_t t = 0; t < slots; ++t) {
      if (kept_row[t] < 0) continue;
      STD_TORCH_CHECK(kept_row[t] < n, "mrprune: kept must lie in [0, lengths[b])");
      used.push_back(t);
      where.push_back(kept_row[t]);
    }
    const int64_t count = static_cast<int64_t>(used.size());
    if (count == 0) continue;
    const RowMatrix m = item_rows(metric, b, n);
    inv.resize(n);
    row_norms(m, nullptr, inv.data());
    inv_k.resize(count);
    for (int64_t s = 0; s < count; ++s) inv_k[s] = inv[where[s]];
    const RowMatrix kept_rows = select_rows(m, where.data(), count);
    cos.resize(static_cast<size_t>(std::max<int64_t>(count * n, 1)));
    visit_cross_tiles(kept_rows, m, [&](int64_t i0, int64_t rows, int64_t j0, int64_t cols, const float* raw,
                                        int64_t ld) {
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t c = 0; c < cols; ++c) cos[(i0 + r) * n + j0 + c] = raw[r * ld + c] * (inv_k[i0 + r] * inv[j0 + c]);
      }
    });
    const int64_t take = std::min(k, std::max<int64_t>(n - 1, 0));
    const float* w = weights.const_data_ptr<float>() + b * tokens;
    torch::stable::parallel_for(0, count, 4, [&](int64_t begin, int64_t end) {
      std::vector<int64_t> order;
      std::vector<float> acc(static_cast<size_t>(dim));
      for (int64_t s = begin; s < end; ++s) {
        const int64_t c = where[s];
        const float* row = cos.data() + s * n;
        order.clear();
        for (int64_t j = 0; j < n; ++j) {
          if (j != c) order.push_back(j);
        }
        std::partial_sort(order.begin(), order.begin() + take, order.end(), [&](int64_t p, int64_t q) {
          return row[p] > row[q] || (row[p] == row[q] && p < q);
        });
        load_row(item_row_ptr(x, b, c), elem, dim, acc.data());
        for (int64_t t = 0; t < take; ++t) axpy_row(w[order[t]], item_row_ptr(x, b, order[t]), elem, dim, acc.data());
        store_row(acc.data(), elem, dim, item_row_ptr(merged, b, used[s]));
        std::copy_n(order.begin(), take, nb + (b * slots + used[s]) * k);
      }
    });
  }
  return {merged, neighbors};
}

}  // namespace mrprune::cpu

STABLE_TORCH_LIBRARY_IMPL(mrprune, CPU, m) {
  m.impl("_knn_weighted_merge_cpu", TORCH_BOX(&mrprune::cpu::knn_weighted_merge_cpu));
}
