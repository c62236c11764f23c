// bipartite_dedup on the CPU: VisPruner's even/odd de-duplication. The cosines of the item's tokens are computed once:
// float32 rows normalised first, then one symmetric BLAS Gram (the official code's order of operations: its rounds
// cascade, so on near-tied tokens it is the float32 rounding that keeps the reference's picks); float16 / bfloat16
// rows in their own precision through gram.h's cosine Gram (float32 accumulation, float32 inverse norms, no float32
// copy of the features). Each round then only reads them: every even-position token's largest cosine to the
// odd-position tokens, a stable descending sort, and the new order [kept evens by score, odds].
// Spec: mrprune.reference.bipartite_dedup.
#include "mrprune/cpu/gram.h"

namespace mrprune::cpu {

Tensor bipartite_dedup_cpu(Tensor features, Tensor lengths, int64_t k, int64_t per_round) {
  check_features(features, "features");
  const int64_t batch = features.size(0), tokens = features.size(1), dim = features.size(2);
  check_lengths(lengths, "lengths", batch, tokens);
  STD_TORCH_CHECK(0 <= k && k <= tokens, "mrprune: k must lie in [0, N]");
  STD_TORCH_CHECK(per_round >= 1, "mrprune: per_round must be >= 1");
  Tensor out = torch::stable::new_empty(features, {batch, k}, ScalarType::Long);
  int64_t* indices = out.mutable_data_ptr<int64_t>();
  std::fill(indices, indices + batch * k, int64_t{-1});
  const int64_t* len = lengths.const_data_ptr<int64_t>();
  const bool half = features.scalar_type() != ScalarType::Float;
  Workspace similarity = workspace(tokens * tokens), normalized = workspace(half ? 0 : tokens * dim);
  std::vector<int64_t> order, evens, odds, rank;
  std::vector<float> score, inv;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t n = len[b];
    if (n == 0 || k == 0) continue;
    order.resize(n);
    for (int64_t i = 0; i < n; ++i) order[i] = i;
    if (n > k) {
      if (half) {
        inv.resize(n);
        const RowMatrix x = item_rows(features, b, n);
        row_norms(x, nullptr, inv.data());
        cosine_gram(x, inv.data(), similarity.get(), n);
      } else {
        normalize_rows(features.const_data_ptr<float>() + b * tokens * dim, n, dim, normalized.get(), nullptr);
        symmetric_gram(normalized.get(), n, dim, similarity.get(), n);
      }
      const float* s = similarity.get();
      while (static_cast<int64_t>(order.size()) > k) {
        const int64_t remaining = static_cast<int64_t>(order.size());
        evens.clear();
        odds.clear();
        for (int64_t p = 0; p < remaining; ++p) (p % 2 == 0 ? evens : odds).push_back(order[p]);
        const int64_t num_evens = static_cast<int64_t>(evens.size());
        const int64_t r = std::min({per_round, remaining - k, num_evens});
        score.resize(num_evens);
        // threads only for rounds with enough work (>= 64k reads per chunk): a parallel region costs more otherwise
        const int64_t grain = std::max<int64_t>(16, (int64_t{1} << 16) / std::max<int64_t>(remaining - num_evens, 1));
        torch::stable::parallel_for(0, num_evens, grain, [&](int64_t begin, int64_t end) {
          for (int64_t a = begin; a < end; ++a) {
            const float* row = s + evens[a] * n;
            float best = -std::numeric_limits<float>::infinity();
            for (const int64_t o : odds) best = std::max(best, row[o]);
            score[a] = best;
          }
        });
        rank.resize(num_evens);
        for (int64_t a = 0; a < num_evens; ++a) rank[a] = a;
        std::stable_sort(rank.begin(), rank.end(), [&](int64_t x, int64_t y) { return score[x] > score[y]; });
        order.clear();
        for (int64_t a = r; a < num_evens; ++a) order.push_back(evens[rank[a]]);
        order.insert(order.end(), odds.begin(), odds.end());
      }
    }
    std::copy(order.begin(), order.end(), indices + b * k);
  }
  return out;
}

}  // namespace mrprune::cpu

STABLE_TORCH_LIBRARY_IMPL(mrprune, CPU, m) {
  m.impl("_bipartite_dedup_cpu", TORCH_BOX(&mrprune::cpu::bipartite_dedup_cpu));
}
