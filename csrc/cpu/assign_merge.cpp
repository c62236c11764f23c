// assign_merge on the CPU: VisionZip's contextual merge in one call. The cosines of every token to the targets are
// computed tile by tile in the metric's own dtype with each token's running best target fused into the visit
// (merge.h; no N x T matrix), then members are summed per slot in float32 and written in x's dtype.
// Spec: mrprune.reference.assign_merge.
#include "mrprune/cpu/merge.h"

namespace mrprune::cpu {

std::tuple<Tensor, Tensor, Tensor> assign_merge_cpu(Tensor x, Tensor metric, Tensor lengths, Tensor targets,
                                                    bool include_target) {
  check_features(x, "x");
  check_features(metric, "metric");
  const int64_t batch = x.size(0), tokens = x.size(1), dim = x.size(2);
  check_sizes(metric, "metric", {batch, tokens});
  check_lengths(lengths, "lengths", batch, tokens);
  check_tensor(targets, "targets", 2, ScalarType::Long);
  STD_TORCH_CHECK(targets.size(0) == batch, "mrprune: targets must have one row per batch item");
  const int64_t slots = targets.size(1);
  const dots::Elem elem = elem_of(x.scalar_type());
  Tensor merged = torch::stable::new_zeros(x, {batch, slots, dim});
  Tensor assignment = torch::stable::new_empty(x, {batch, tokens}, ScalarType::Long);
  Tensor sizes = torch::stable::new_zeros(x, {batch, slots}, ScalarType::Long);
  int64_t* assign = assignment.mutable_data_ptr<int64_t>();
  std::fill(assign, assign + batch * tokens, int64_t{-1});
  const int64_t* len = lengths.const_data_ptr<int64_t>();
  std::vector<int64_t> used, where, arg;
  std::vector<float> inv, inv_t, best, acc, target;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t n = len[b];
    const int64_t* t_row = targets.const_data_ptr<int64_t>() + b * slots;
    used.clear();
    where.clear();
    for (int64_t t = 0; t < slots; ++t) {
      if (t_row[t] < 0) continue;
      STD_TORCH_CHECK(t_row[t] < n, "mrprune: targets must lie in [0, lengths[b])");
      used.push_back(t);
      where.push_back(t_row[t]);
    }
    const int64_t count = static_cast<int64_t>(used.size());
    if (n == 0 || count == 0) continue;
    const RowMatrix m = item_rows(metric, b, n);
    inv.resize(n);
    row_norms(m, nullptr, inv.data());
    inv_t.resize(count);
    for (int64_t s = 0; s < count; ++s) inv_t[s] = inv[where[s]];
    const RowMatrix t_rows = select_rows(m, where.data(), count);  // in slot order: ties go to the lower slot
    best.resize(n);
    arg.resize(n);
    best_cosine_match(m, inv.data(), t_rows, inv_t.data(), best.data(), arg.data());
    int64_t* a = assign + b * tokens;
    for (int64_t i = 0; i < n; ++i) a[i] = used[arg[i]];
    for (int64_t s = 0; s < count; ++s) a[where[s]] = -2 - s;  // mark the targets (restored below)
    int64_t* size = sizes.mutable_data_ptr<int64_t>() + b * slots;
    acc.assign(static_cast<size_t>(slots * dim), 0.f);
    for (int64_t i = 0; i < n; ++i) {
      if (a[i] < 0) continue;
      ++size[a[i]];
      axpy_row(1.f, item_row_ptr(x, b, i), elem, dim, acc.data() + a[i] * dim);
    }
    for (int64_t s = 0; s < count; ++s) a[where[s]] = used[s];
    target.resize(dim);
    for (int64_t s = 0; s < count; ++s) {
      const int64_t t = used[s];
      const float members = static_cast<float>(size[t]);
      float* row = acc.data() + t * dim;
      load_row(item_row_ptr(x, b, where[s]), elem, dim, target.data());
      for (int64_t c = 0; c < dim; ++c) {
        row[c] = include_target ? (target[c] + row[c]) / (members + 1.f) : target[c] + row[c] / std::max(members, 1.f);
      }
      store_row(row, elem, dim, item_row_ptr(merged, b, t));
      size[t] += 1;
    }
  }
  return {merged, assignment, sizes};
}

}  // namespace mrprune::cpu

STABLE_TORCH_LIBRARY_IMPL(mrprune, CPU, m) { m.impl("_assign_merge_cpu", TORCH_BOX(&mrprune::cpu::assign_merge_cpu)); }
