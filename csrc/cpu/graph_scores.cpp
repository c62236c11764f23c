// graph_scores on the CPU: features to (w^T P^t) / degree. The CPU may materialise P: one N x N float32 workspace,
// reused for every item (the GPU kernels stream it instead). Spec: mrprune.reference.graph_scores.
#include "mrprune/cpu/common.h"

namespace mrprune::cpu {

Tensor graph_scores_cpu(Tensor features, Tensor lengths, std::optional<Tensor> weights, double threshold,
                        double temperature, int64_t iterations) {
  check_tensor(features, "features", 3, ScalarType::Float);
  if (weights.has_value()) check_tensor(*weights, "weights", 2, ScalarType::Float);
  const int64_t batch = features.size(0), tokens = features.size(1), dim = features.size(2);
  check_lengths(lengths, "lengths", batch, tokens);
  if (weights.has_value()) check_sizes(*weights, "weights", {batch, tokens});
  Tensor scores = torch::stable::new_zeros(features, {batch, tokens});
  Workspace graph = workspace(tokens * tokens), normalized = workspace(tokens * dim);
  float* p = graph.get();
  std::vector<float> norms(tokens), degree(tokens);
  const float* x = features.const_data_ptr<float>();
  const int64_t* len = lengths.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t n = len[b];
    normalize_rows(x + b * tokens * dim, n, dim, normalized.get(), norms.data());
    symmetric_gram(normalized.get(), n, dim, p, n);
    edge_softmax_rows(p, n, n, static_cast<float>(threshold), static_cast<float>(temperature), degree.data());
    const float* w = weights.has_value() ? weights->const_data_ptr<float>() + b * tokens : norms.data();
    propagate(p, n, n, w, degree.data(), iterations, scores.mutable_data_ptr<float>() + b * tokens);
  }
  return scores;
}

}  // namespace mrprune::cpu

STABLE_TORCH_LIBRARY_IMPL(mrprune, CPU, m) { m.impl("_graph_scores_cpu", TORCH_BOX(&mrprune::cpu::graph_scores_cpu)); }
