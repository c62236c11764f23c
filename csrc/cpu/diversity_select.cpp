// diversity_select on the CPU: DivPrune's greedy max-min selection on the features' own precision.
// Spec: mrprune.reference.diversity_select.
//
// Cosines come from gram.h (raw dot products in a per-pair fixed order, scaled by float32 inverse norms), so the
// Gram is bitwise symmetric and duplicate tokens tie exactly, whatever their positions; ties go to the lower index.
// Up to the workspace budget (gram.h) the n x n cosine Gram is built once from its upper triangle; past it (video
// token counts) nothing n x n is stored: the first pick's statistic comes from one pass over the upper-triangle
// tiles, and each pick's cosine row is recomputed from the features (O(n D) per pick, a fixed 16-lane order per
// pair, so duplicates still tie).
#include "mrprune/cpu/gram.h"

#include <mutex>

namespace mrprune::cpu {
namespace {

// The two smallest values seen (with multiplicity).
struct TwoSmallest {
  float first = std::numeric_limits<float>::infinity();
  float second = std::numeric_limits<float>::infinity();

  void add(float v) {
    if (v < first) {
      second = first;
      first = v;
    } else if (v < second) {
      second = v;
    }
  }
  void merge(const TwoSmallest& other) {
    add(other.first);
    add(other.second);
  }
  // A column's nearest other token: the second-smallest distance (the smallest is normally the self-distance).
  float nearest_other(int64_t n) const { return n > 1 ? second : first; }
};

// 1 - cos, with the cosine capped at 1: the float32 cosine of collinear tokens can round to 1 + ulp, and a negative
// self-distance would outrank the exact ties (distance 0) that the lower-index rule must settle.
inline float cosine_distance(float cosine) { return 1.f - std::min(cosine, 1.f); }

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

// Initial scores without an n x n matrix: per-chunk two-smallest distances of every column from the upper tiles
// (each pair counts for its row and its column), merged exactly (min is order-free).
void initial_scores_streaming(const RowMatrix& x, const float* inv, std::vector<float>& score) {
  const int64_t n = x.rows;
  const UpperTiles tiles(x);
  std::vector<std::vector<TwoSmallest>> partial(tiles.items());
  tiles.visit([&](int64_t i0, int64_t m, int64_t j0, int64_t cols, const float* raw, int64_t ld, int64_t slot) {
    std::vector<TwoSmallest>& mine = partial[slot];
    if (mine.empty()) mine.resize(n);
    for (int64_t r = 0; r < m; ++r) {
      const int64_t i = i0 + r;
      for (int64_t c = std::max<int64_t>(0, i - j0); c < cols; ++c) {
        const int64_t j = j0 + c;
        const float distance = cosine_distance(raw[r * ld + c] * (inv[i] * inv[j]));
        mine[i].add(distance);
        if (j != i) mine[j].add(distance);
      }
    }
  });
  std::vector<TwoSmallest> merged(n);
  for (const auto& mine : partial) {
    for (int64_t i = 0; i < static_cast<int64_t>(mine.size()); ++i) merged[i].merge(mine[i]);
  }
  for (int64_t i = 0; i < n; ++i) score[i] = merged[i].nearest_other(n);
}

}  // namespace

Tensor diversity_select_cpu(Tensor features, Tensor lengths, int64_t k, bool mask_picked) {
  check_features(features, "features");
  const int64_t batch = features.size(0), tokens = features.size(1);
  check_lengths(lengths, "lengths", batch, tokens);
  STD_TORCH_CHECK(0 <= k && k <= tokens, "mrprune: k must lie in [0, N]");
  Tensor out = torch::stable::new_empty(features, {batch, k}, ScalarType::Long);
  int64_t* indices = out.mutable_data_ptr<int64_t>();
  std::fill(indices, indices + batch * k, int64_t{-1});
  const int64_t* len = lengths.const_data_ptr<int64_t>();
  std::vector<float> score, nearest, inv, streamed_row;
  std::vector<uint8_t> picked;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t n = len[b];
    if (n == 0 || k == 0) continue;
    const RowMatrix x = item_rows(features, b, n);
    inv.resize(n);
    row_norms(x, nullptr, inv.data());
    score.resize(n);
    const bool materialise = n * n * static_cast<int64_t>(sizeof(float)) <= workspace_budget(x);
    Workspace similarity = workspace(materialise ? n * n : 1);
    if (materialise) {
      cosine_gram(x, inv.data(), similarity.get(), n);
      torch::stable::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
        for (int64_t j = begin; j < end; ++j) {
          TwoSmallest two;
          for (int64_t i = 0; i < n; ++i) two.add(cosine_distance(similarity[j * n + i]));
          score[j] = two.nearest_other(n);
        }
      });
    } else {
      initial_scores_streaming(x, inv.data(), score);
      streamed_row.resize(n);
    }
    // Row j of the cosine Gram: stored, or recomputed from the features.
    auto cosine_row = [&](int64_t j) -> const float* {
      if (materialise) return similarity.get() + j * n;
      torch::stable::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          streamed_row[i] = dots::dot_rows(x.row(j), x.row(i), x.elem, x.d) * (inv[j] * inv[i]);
        }
      });
      return streamed_row.data();
    };
    nearest.assign(n, std::numeric_limits<float>::infinity());
    picked.assign(n, 0);
    int64_t j = first_argmax(score, nullptr);
    for (int64_t t = 0; t < std::min(k, n); ++t) {
      indices[b * k + t] = j;
      picked[j] = 1;
      const float* row = cosine_row(j);
      for (int64_t i = 0; i < n; ++i) nearest[i] = std::min(nearest[i], cosine_distance(row[i]));
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
