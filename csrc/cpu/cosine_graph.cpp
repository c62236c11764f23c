// cosine_graph on the CPU: the cosine Gram of the features in their stored precision (gram.h: upper-triangle tiles,
// float32 accumulation, bitwise symmetric), then the thresholded softmax of every row, written straight into the
// output graph. Spec: mrprune.reference.cosine_graph.
#include "mrprune/cpu/gram.h"

namespace mrprune::cpu {

std::tuple<Tensor, Tensor> cosine_graph_cpu(Tensor features, Tensor lengths, double threshold, double temperature) {
  check_features(features, "features");
  const int64_t batch = features.size(0), tokens = features.size(1);
  check_lengths(lengths, "lengths", batch, tokens);
  Tensor graph = torch::stable::new_zeros(features, {batch, tokens, tokens}, ScalarType::Float);
  Tensor degree = torch::stable::new_zeros(features, {batch, tokens}, ScalarType::Float);
  std::vector<float> inv(tokens);
  const int64_t* len = lengths.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t n = len[b];
    float* p = graph.mutable_data_ptr<float>() + b * tokens * tokens;
    const RowMatrix x = item_rows(features, b, n);
    row_norms(x, nullptr, inv.data());
    cosine_gram(x, inv.data(), p, tokens);
    edge_softmax_rows(p, n, tokens, static_cast<float>(threshold), static_cast<float>(temperature),
                      degree.mutable_data_ptr<float>() + b * tokens);
  }
  return {graph, degree};
}

}  // namespace mrprune::cpu

STABLE_TORCH_LIBRARY_IMPL(mrprune, CPU, m) { m.impl("_cosine_graph_cpu", TORCH_BOX(&mrprune::cpu::cosine_graph_cpu)); }
