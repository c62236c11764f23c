// diversity_select on the CPU: DivPrune's greedy max-min selection. One symmetric GEMM for the cosines, then k
// O(n) steps on a running nearest-picked distance, with d = 1 - cos rounded in float32 exactly as the reference.
// Spec: mrprune.reference.diversity_select.
#include "mrprune/cpu/common.h"

namespace mrprune::cpu {
namespace {

// Column j's second-smallest distance (its nearest other token; the smallest is normally the self-distance).
float second_smallest_distance(const float* similarity_row, int64_t n) {
  float smallest = std::numeric_limits<float>::infinity(), second = smallest;
  for (int64_t i = 0; i < n; ++i) {
    const float d = 1.f - similarity_row[i];
    if (d < smallest) {
      second = smallest;
      smallest = d;
    } else if (d < second) {
      second = d;
    }
  }
  return n > 1 ? second : smallest;
}

// argmax with ties to the lower index; masked entries never win.
int64_t first_argmax(const std::vector<float>& score, const std::vector<uint8_t>* masked) {
  int64_t best = -1;
  float best_score = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < static_cast<int64_t>(score.size()); ++i) {
    if (masked != nullptr && (*masked)[i]) continue;
    if (best < 0 || score[i] > best_score) best = i, best_score = score[i];
  }
  return best;
}

}  // namespace

Tensor diversity_select_cpu(Tensor features, Tensor lengths, int64_t k, bool mask_picked) {
  check_tensor(features, "features", 3, ScalarType::Float);
  const int64_t batch = features.size(0), tokens = features.size(1), dim = features.size(2);
  check_lengths(lengths, "lengths", batch, tokens);
  STD_TORCH_CHECK(0 <= k && k <= tokens, "mrprune: k must lie in [0, N]");
  Tensor out = torch::stable::new_empty(features, {batch, k}, ScalarType::Long);
  int64_t* indices = out.mutable_data_ptr<int64_t>();
  std::fill(indices, indices + batch * k, int64_t{-1});
  const int64_t* len = lengths.const_data_ptr<int64_t>();
  Workspace normalized = workspace(tokens * dim), similarity = workspace(tokens * tokens);
  std::vector<float> score, nearest;
  std::vector<uint8_t> picked;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t n = len[b];
    if (n == 0 || k == 0) continue;
    normalize_rows(features.const_data_ptr<float>() + b * tokens * dim, n, dim, normalized.get(), nullptr);
    symmetric_gram(normalized.get(), n, dim, similarity.get(), n);
    score.resize(n);
    torch::stable::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) score[j] = second_smallest_distance(similarity.get() + j * n, n);
    });
    nearest.assign(n, std::numeric_limits<float>::infinity());
    picked.assign(n, 0);
    int64_t j = first_argmax(score, nullptr);
    for (int64_t t = 0; t < std::min(k, n); ++t) {
      indices[b * k + t] = j;
      picked[j] = 1;
      const float* row = similarity.get() + j * n;
      for (int64_t i = 0; i < n; ++i) nearest[i] = std::min(nearest[i], 1.f - row[i]);
      j = first_argmax(nearest, mask_picked ? &picked : nullptr);
      if (j < 0) break;
    }
  }
  return out;
}

}  // namespace mrprune::cpu

STABLE_TORCH_LIBRARY_IMPL(mrprune, CPU, m) {
  m.impl("_diversity_select_cpu", TORCH_BOX(&mrprune::cpu::diversity_select_cpu));
}
