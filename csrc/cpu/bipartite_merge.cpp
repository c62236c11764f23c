// bipartite_merge on the CPU: ToMe's bipartite soft matching and size-weighted merge in one call. The even/odd
// cosine block (a quarter of the Gram) is computed tile by tile in the metric's own dtype with each even token's
// running best odd partner fused into the visit (merge.h), so no similarity matrix exists; a stable sort picks the r
// pairs; merged rows are accumulated in float32 and written in x's dtype, untouched rows copied bit for bit.
// Spec: mrprune.reference.bipartite_merge.
#include "mrprune/cpu/merge.h"

namespace mrprune::cpu {

std::tuple<Tensor, Tensor, Tensor, Tensor> bipartite_merge_cpu(Tensor x, Tensor metric, Tensor lengths, int64_t r,
                                                               std::optional<Tensor> sizes, bool protect_first,
                                                               bool spatial_order) {
  check_features(x, "x");
  check_features(metric, "metric");
  const int64_t batch = x.size(0), tokens = x.size(1), dim = x.size(2);
  check_sizes(metric, "metric", {batch, tokens});
  check_lengths(lengths, "lengths", batch, tokens);
  STD_TORCH_CHECK(0 <= r && r <= tokens, "mrprune: r must lie in [0, N]");
  if (sizes.has_value()) {
    check_tensor(*sizes, "sizes", 2, ScalarType::Float);
    check_sizes(*sizes, "sizes", {batch, tokens});
  }
  const int64_t out_tokens = tokens - r;
  const dots::Elem elem = elem_of(x.scalar_type());
  const int64_t row_bytes = dim * dots::elem_size(elem);
  Tensor merged = torch::stable::new_zeros(x, {batch, out_tokens, dim});
  Tensor merged_sizes = torch::stable::new_zeros(x, {batch, out_tokens}, ScalarType::Float);
  Tensor source = torch::stable::new_empty(x, {batch, tokens}, ScalarType::Long);
  Tensor out_lengths = torch::stable::new_empty(x, {batch}, ScalarType::Long);
  int64_t* src = source.mutable_data_ptr<int64_t>();
  std::fill(src, src + batch * tokens, int64_t{-1});
  const int64_t* len = lengths.const_data_ptr<int64_t>();
  std::vector<float> inv, best, size, acc;
  std::vector<int64_t> partner, rank, rows, slot;
  std::vector<char> absorbed;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t n = len[b];
    const int64_t protect = protect_first && n > 0 ? 1 : 0;
    const int64_t rb = std::min(r, std::max<int64_t>(n - protect, 0) / 2);
    const int64_t evens = (n + 1) / 2, odds = n / 2;
    out_lengths.mutable_data_ptr<int64_t>()[b] = n - rb;
    if (n == 0) continue;
    size.assign(static_cast<size_t>(n), 1.f);
    if (sizes.has_value()) std::copy_n(sizes->const_data_ptr<float>() + b * tokens, n, size.begin());
    best.resize(evens);
    partner.resize(evens);
    if (rb > 0 || !protect_first) {  // the scores only matter for what merges and for the unprotected output order
      const RowMatrix m = item_rows(metric, b, n);
      inv.resize(n);
      row_norms(m, nullptr, inv.data());
      even_odd_best_match(m, inv.data(), n, best.data(), partner.data());
    } else {
      std::fill(best.begin(), best.end(), 0.f);
    }
    if (protect) best[0] = -std::numeric_limits<float>::infinity();
    rank.resize(evens);
    for (int64_t a = 0; a < evens; ++a) rank[a] = a;
    std::stable_sort(rank.begin(), rank.end(), [&](int64_t p, int64_t q) { return best[p] > best[q]; });
    // output rows -> input positions: [unmerged evens, odds] (or by position)
    rows.clear();
    for (int64_t t = rb; t < evens; ++t) rows.push_back(2 * rank[t]);
    if (protect) std::sort(rows.begin(), rows.end());
    for (int64_t o = 0; o < odds; ++o) rows.push_back(2 * o + 1);
    if (spatial_order) std::sort(rows.begin(), rows.end());
    const int64_t count = static_cast<int64_t>(rows.size());
    slot.assign(static_cast<size_t>(n), -1);
    for (int64_t t = 0; t < count; ++t) slot[rows[t]] = t;
    absorbed.assign(static_cast<size_t>(count), 0);
    for (int64_t t = 0; t < rb; ++t) {
      const int64_t a = rank[t];
      slot[2 * a] = slot[2 * partner[a] + 1];
      absorbed[slot[2 * a]] = 1;
    }
    // size-weighted sums of the absorbing rows, in position order (float32)
    acc.assign(static_cast<size_t>(count * dim), 0.f);
    float* mass = merged_sizes.mutable_data_ptr<float>() + b * out_tokens;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t t = slot[i];
      mass[t] += size[i];
      if (absorbed[t]) axpy_row(size[i], item_row_ptr(x, b, i), elem, dim, acc.data() + t * dim);
    }
    torch::stable::parallel_for(0, count, 64, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        char* out = item_row_ptr(merged, b, t);
        if (!absorbed[t]) {
          std::memcpy(out, item_row_ptr(x, b, rows[t]), static_cast<size_t>(row_bytes));
          continue;
        }
        float* row = acc.data() + t * dim;
        for (int64_t c = 0; c < dim; ++c) row[c] /= mass[t];
        store_row(row, elem, dim, out);
      }
    });
    std::copy(slot.begin(), slot.end(), src + b * tokens);
  }
  return {merged, merged_sizes, source, out_lengths};
}

}  // namespace mrprune::cpu

STABLE_TORCH_LIBRARY_IMPL(mrprune, CPU, m) {
  m.impl("_bipartite_merge_cpu", TORCH_BOX(&mrprune::cpu::bipartite_merge_cpu));
}
