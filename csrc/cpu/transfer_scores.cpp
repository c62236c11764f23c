// transfer_scores on the CPU: per item, the masked keys read in place (stored precision), the query x key cosine
// block from gram.h tiles (float32 accumulation, scaled by float32 inverse norms), then per query row the
// thresholded-softmax statistics and the weighted mass, without storing the softmax.
// Spec: mrprune.reference.transfer_scores.
#include "mrprune/cpu/gram.h"


namespace mrprune::cpu {

Tensor transfer_scores_cpu(Tensor queries, Tensor query_lengths, Tensor keys, Tensor key_mask,
                           std::optional<Tensor> key_weights, double threshold, double temperature) {
  check_features(queries, "queries");
  check_features(keys, "keys");
  STD_TORCH_CHECK(queries.scalar_type() == keys.scalar_type(), "mrprune: queries and keys must share a dtype");
  check_tensor(key_mask, "key_mask", 2, ScalarType::Bool);
  if (key_weights.has_value()) check_tensor(*key_weights, "key_weights", 2, ScalarType::Float);
  const int64_t batch = queries.size(0), max_queries = queries.size(1), dim = queries.size(2);
  const int64_t max_keys = keys.size(1);
  check_lengths(query_lengths, "query_lengths", batch, max_queries);
  check_sizes(keys, "keys", {batch, max_keys, dim});
  check_sizes(key_mask, "key_mask", {batch, max_keys});
  if (key_weights.has_value()) check_sizes(*key_weights, "key_weights", {batch, max_keys});
  const float thr = static_cast<float>(threshold), temp = static_cast<float>(temperature);
  Tensor prop = torch::stable::new_zeros(queries, {batch, max_queries}, ScalarType::Float);
  const dots::Elem elem = elem_of(keys.scalar_type());
  std::vector<float> key_inv(max_keys), query_inv(max_queries);
  Workspace similarity = workspace(max_queries * max_keys);
  std::vector<int64_t> selected_keys;
  std::vector<float> weight(max_keys);
  const std::vector<float> ones(max_keys, 1.f);  // for_each_at_least scales by inverse norms: the row is cosines
  const int64_t* qlen = query_lengths.const_data_ptr<int64_t>();
  const bool* mask = key_mask.const_data_ptr<bool>();
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t m = qlen[b];
    selected_keys.clear();
    for (int64_t j = 0; j < max_keys; ++j) {
      if (mask[b * max_keys + j]) selected_keys.push_back(j);
    }
    const int64_t selected = static_cast<int64_t>(selected_keys.size());
    if (selected == 0 || m == 0) continue;  // nothing pruned to transfer from: prop stays 0 (not 0/0)
    // The selected keys read in place (stored precision); their weights default to their norms.
    const RowMatrix key_rows{item_rows(keys, b, max_keys).data, elem, selected, dim, dim, selected_keys.data()};
    const RowMatrix query_rows = item_rows(queries, b, m);
    row_norms(key_rows, weight.data(), key_inv.data());
    row_norms(query_rows, nullptr, query_inv.data());
    if (key_weights.has_value()) {
      for (int64_t s = 0; s < selected; ++s) weight[s] = key_weights->const_data_ptr<float>()[b * max_keys + selected_keys[s]];
    }
    // The cosine block (need: the pairs a screen left in, or nullptr for all; the others are below the threshold,
    // stored as -inf: never an edge).
    const auto store = [&](int64_t i0, int64_t rows, int64_t j0, int64_t cols, const float* raw, int64_t ld,
                           const uint8_t* need) {
      for (int64_t r = 0; r < rows; ++r) {
        float* out = similarity.get() + (i0 + r) * selected + j0;
        for (int64_t c = 0; c < cols; ++c) {
          out[c] = need == nullptr || need[r * ld + c] ? raw[r * ld + c] * (query_inv[i0 + r] * key_inv[j0 + c])
                                                       : -std::numeric_limits<float>::infinity();
        }
      }
    };
    const Screen query_screen(query_rows, query_inv.data(), thr);
    const Screen key_screen(key_rows, key_inv.data(), thr);
    if (query_screen.active() && key_screen.active()) {
      std::fill(similarity.get(), similarity.get() + m * selected, -std::numeric_limits<float>::infinity());
      visit_cross_blocks_screened(query_rows, query_screen, query_inv.data(), key_rows, key_screen, key_inv.data(),
                                  store);
    } else {
      visit_cross_blocks(query_rows, key_rows,
                         [&](int64_t i0, int64_t rows, int64_t j0, int64_t cols, const float* raw, int64_t ld) {
                           store(i0, rows, j0, cols, raw, ld, nullptr);
                         });
    }
    float* out = prop.mutable_data_ptr<float>() + b * max_queries;
    torch::stable::parallel_for(0, m, 16, [&](int64_t begin, int64_t end) {
      std::vector<std::pair<int64_t, float>> edges;  // (key, logit) of one row, ascending key
      for (int64_t i = begin; i < end; ++i) {
        const float* row = similarity.get() + i * selected;
        // The row's edges from one vectorised threshold scan (a row holds ~1 % edges at the LLaVA-NeXT shape).
        edges.clear();
        for_each_at_least(row, ones.data(), 1.f, selected, thr, [&](int64_t j, float s) {
          float z;
          if (is_edge(s, thr, temp, &z)) edges.push_back({j, z});
        });
        const EdgeRowStats stats = edge_stats(selected, [&](const auto& fn) {
          for (const auto& edge : edges) fn(edge.second);
        });
        float mass = 0.f;
        if (stats.fill == 0.f) {  // the non-edge terms are all +-0 (weights are checked finite): they change no bit
          for (const auto& [j, z] : edges) mass += weight[j] * (std::exp(z - stats.max_logit) / stats.denominator);
        } else {
          for (int64_t j = 0, e = 0; j < selected; ++j) {
            const bool edge = e < static_cast<int64_t>(edges.size()) && edges[e].first == j;
            const float numerator = edge ? std::exp(edges[e++].second - stats.max_logit) : stats.fill;
            mass += weight[j] * (numerator / stats.denominator);
          }
        }
        out[i] = mass / stats.degree(selected);
      }
    });
  }
  return prop;
}

}  // namespace mrprune::cpu

STABLE_TORCH_LIBRARY_IMPL(mrprune, CPU, m) {
  m.impl("_transfer_scores_cpu", TORCH_BOX(&mrprune::cpu::transfer_scores_cpu));
}
