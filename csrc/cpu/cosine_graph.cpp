// cosine_graph on the CPU: normalised symmetric Gram (BLAS on the block upper triangle), then the thresholded
// softmax of every row, written straight into the output graph. Spec: mrprune.reference.cosine_graph.
#include "mrprune/cpu/common.h"

namespace mrprune::cpu {

std::tuple<Tensor, Tensor> cosine_graph_cpu(Tensor features, Tensor lengths, double threshold, double temperature) {
  check_tensor(features, "features", 3, ScalarType::Float);
  const int64_t batch = features.size(0), tokens = features.size(1), dim = features.size(2);
  check_lengths(lengths, "lengths", batch, tokens);
  Tensor graph = torch::stable::new_zeros(features, {batch, tokens, tokens});
  Tensor degree = torch::stable::new_zeros(features, {batch, tokens});
  Workspace normalized = workspace(tokens * dim);
  const float* x = features.const_data_ptr<float>();
  const int64_t* len = lengths.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t n = len[b];
    float* p = graph.mutable_data_ptr<float>() + b * tokens * tokens;
    normalize_rows(x + b * tokens * dim, n, dim, normalized.get(), nullptr);
    symmetric_gram(normalized.get(), n, dim, p, tokens);
    edge_softmax_rows(p, n, tokens, static_cast<float>(threshold), static_cast<float>(temperature),
                      degree.mutable_data_ptr<float>() + b * tokens);
  }
  return {graph, degree};
}

}  // namespace mrprune::cpu

STABLE_TORCH_LIBRARY_IMPL(mrprune, CPU, m) { m.impl("_cosine_graph_cpu", TORCH_BOX(&mrprune::cpu::cosine_graph_cpu)); }
