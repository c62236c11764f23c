// graph_propagate on the CPU: t vector-matrix products (BLAS GEMV) per item, never a matrix power.
// Spec: mrprune.reference.graph_propagate.
#include "mrprune/cpu/common.h"

namespace mrprune::cpu {

Tensor graph_propagate_cpu(Tensor graph, Tensor degree, Tensor weights, Tensor lengths, int64_t iterations) {
  check_tensor(graph, "graph", 3, ScalarType::Float);
  check_tensor(degree, "degree", 2, ScalarType::Float);
  check_tensor(weights, "weights", 2, ScalarType::Float);
  const int64_t batch = graph.size(0), tokens = graph.size(1);
  check_lengths(lengths, "lengths", batch, tokens);
  check_sizes(graph, "graph", {batch, tokens, tokens});
  check_sizes(degree, "degree", {batch, tokens});
  check_sizes(weights, "weights", {batch, tokens});
  Tensor scores = torch::stable::new_zeros(weights, {batch, tokens});
  const int64_t* len = lengths.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    propagate(graph.const_data_ptr<float>() + b * tokens * tokens, len[b], tokens,
              weights.const_data_ptr<float>() + b * tokens, degree.const_data_ptr<float>() + b * tokens, iterations,
              scores.mutable_data_ptr<float>() + b * tokens);
  }
  return scores;
}

}  // namespace mrprune::cpu

STABLE_TORCH_LIBRARY_IMPL(mrprune, CPU, m) {
  m.impl("_graph_propagate_cpu", TORCH_BOX(&mrprune::cpu::graph_propagate_cpu));
}
