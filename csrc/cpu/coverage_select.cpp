// coverage_select on the CPU: SCOPE's saliency-weighted greedy coverage. One symmetric Gram for the cosines (gram.h:
// the features in their own precision, float32 accumulation, scaled by float32 inverse norms), then a
// lazy greedy: a token's weighted gain a_j^alpha * sum_i max(0, S_ij - cur_i) can only shrink as the coverage cur
// grows, and it does so in float32 too (every term, the fixed-order sum and the product round monotonically), so a
// stale gain is an upper bound and the greedy re-evaluates only the tokens that reach the top of a max-heap. The
// picks are those of the eager greedy with this summation order. Spec: mrprune.reference.coverage_select.
#include <cmath>
#include <optional>
#include <queue>

#include "mrprune/cpu/gram.h"

namespace mrprune::cpu {
namespace {

// sum_i max(0, s_i - cur_i) in a fixed order (8 interleaved partial sums, as dot()).
float coverage_gain(const float* s, const float* cur, int64_t n) {
  float partial[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int lane = 0; lane < 8; ++lane) partial[lane] += std::max(0.f, s[i + lane] - cur[i + lane]);
  }
  for (; i < n; ++i) partial[i % 8] += std::max(0.f, s[i] - cur[i]);
  return ((partial[0] + partial[1]) + (partial[2] + partial[3])) + ((partial[4] + partial[5]) + (partial[6] + partial[7]));
}

struct Candidate {
  float score;
  int64_t index;
  int64_t stamp;  // the step at which score was computed
};

// Heap order: larger score first, then the lower index (the spec's tie rule).
struct Worse {
  bool operator()(const Candidate& a, const Candidate& b) const {
    return a.score < b.score || (a.score == b.score && a.index > b.index);
  }
};

}  // namespace

Tensor coverage_select_cpu(Tensor features, Tensor lengths, int64_t k, std::optional<Tensor> saliency, double alpha) {
  check_features(features, "features");
  const int64_t batch = features.size(0), tokens = features.size(1), dim = features.size(2);
  check_lengths(lengths, "lengths", batch, tokens);
  STD_TORCH_CHECK(0 <= k && k <= tokens, "mrprune: k must lie in [0, N]");
  const float* weights_all = nullptr;
  if (saliency.has_value()) {
    check_tensor(*saliency, "saliency", 2, ScalarType::Float);
    check_sizes(*saliency, "saliency", {batch, tokens});
    weights_all = saliency->const_data_ptr<float>();
  }
  Tensor out = torch::stable::new_empty(features, {batch, k}, ScalarType::Long);
  int64_t* indices = out.mutable_data_ptr<int64_t>();
  std::fill(indices, indices + batch * k, int64_t{-1});
  const int64_t* len = lengths.const_data_ptr<int64_t>();
  Workspace similarity = workspace(tokens * tokens);
  std::vector<float> weight, cur, norms, inv;
  std::vector<Candidate> initial;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t n = len[b];
    if (n == 0 || k == 0) continue;
    norms.resize(n);
    inv.resize(n);
    const RowMatrix x = item_rows(features, b, n);
    row_norms(x, norms.data(), inv.data());
    cosine_gram(x, inv.data(), similarity.get(), n);
    // a token's cosine with itself is exactly 1 (the spec), not 1 +- rounding, so that exact ties stay exact
    for (int64_t j = 0; j < n; ++j) {
      if (norms[j] >= kNormEps) similarity[j * n + j] = 1.f;
    }
    const float* s = similarity.get();
    weight.assign(n, 1.f);
    if (weights_all != nullptr) {
      for (int64_t j = 0; j < n; ++j) weight[j] = std::pow(weights_all[b * tokens + j], static_cast<float>(alpha));
    }
    cur.assign(n, 0.f);
    initial.resize(n);
    torch::stable::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) initial[j] = {coverage_gain(s + j * n, cur.data(), n) * weight[j], j, 0};
    });
    std::priority_queue<Candidate, std::vector<Candidate>, Worse> heap(Worse{}, initial);
    for (int64_t t = 0; t < std::min(k, n); ++t) {
      Candidate top = heap.top();
      heap.pop();
      while (top.stamp != t) {  // stale: re-evaluate against the current coverage and put it back
        heap.push({coverage_gain(s + top.index * n, cur.data(), n) * weight[top.index], top.index, t});
        top = heap.top();
        heap.pop();
      }
      const int64_t j = top.index;
      indices[b * k + t] = j;
      const float* row = s + j * n;  // S is exactly symmetric: row j is column j
      for (int64_t i = 0; i < n; ++i) cur[i] = std::max(cur[i], row[i]);
    }
  }
  return out;
}

}  // namespace mrprune::cpu

STABLE_TORCH_LIBRARY_IMPL(mrprune, CPU, m) {
  m.impl("_coverage_select_cpu", TORCH_BOX(&mrprune::cpu::coverage_select_cpu));
}
