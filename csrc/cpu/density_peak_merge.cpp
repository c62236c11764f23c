// density_peak_merge on the CPU: SparseVLM v1's DPC-kNN clustering and mean merge in one call. Pairwise distances
// are computed from the differences (exactly 0 for duplicates, exactly symmetric; the recycled token sets are a few
// hundred tokens), then density, distance to a denser token, centres, assignment and the mean, in float32.
// Spec: mrprune.reference.density_peak_merge.
#include "mrprune/cpu/merge.h"

namespace mrprune::cpu {

std::tuple<Tensor, Tensor, Tensor> density_peak_merge_cpu(Tensor x, Tensor lengths, int64_t clusters,
                                                          std::optional<int64_t> neighbors) {
  check_features(x, "x");
  const int64_t batch = x.size(0), tokens = x.size(1), dim = x.size(2);
  check_lengths(lengths, "lengths", batch, tokens);
  STD_TORCH_CHECK(0 <= clusters && clusters <= tokens, "mrprune: clusters must lie in [0, N]");
  const int64_t m_nearest = neighbors.has_value() ? *neighbors : clusters;
  const dots::Elem elem = elem_of(x.scalar_type());
  Tensor merged = torch::stable::new_zeros(x, {batch, clusters, dim});
  Tensor assignment = torch::stable::new_empty(x, {batch, tokens}, ScalarType::Long);
  Tensor centers = torch::stable::new_empty(x, {batch, clusters}, ScalarType::Long);
  int64_t* assign = assignment.mutable_data_ptr<int64_t>();
  int64_t* centre = centers.mutable_data_ptr<int64_t>();
  std::fill(assign, assign + batch * tokens, int64_t{-1});
  std::fill(centre, centre + batch * clusters, int64_t{-1});
  const int64_t* len = lengths.const_data_ptr<int64_t>();
  const float inv_sqrt_dim = 1.f / std::sqrt(static_cast<float>(std::max<int64_t>(dim, 1)));
  std::vector<float> values, dist, density, score, acc;
  std::vector<int64_t> order, slot_of;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t n = len[b], c = std::min(clusters, n);
    if (c == 0) continue;
    values.resize(static_cast<size_t>(n * dim));
    for (int64_t i = 0; i < n; ++i) load_row(item_row_ptr(x, b, i), elem, dim, values.data() + i * dim);
    dist.assign(static_cast<size_t>(n * n), 0.f);
    torch::stable::parallel_for(0, n, 8, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        for (int64_t j = i + 1; j < n; ++j) {
          float sum = 0.f;
          for (int64_t e = 0; e < dim; ++e) {
            const float d = values[i * dim + e] - values[j * dim + e];
            sum += d * d;
          }
          dist[i * n + j] = std::sqrt(sum) * inv_sqrt_dim;
        }
      }
    });
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = 0; j < i; ++j) dist[i * n + j] = dist[j * n + i];
    }
    const int64_t m = std::max<int64_t>(1, std::min(m_nearest, n));
    density.resize(n);
    torch::stable::parallel_for(0, n, 8, [&](int64_t begin, int64_t end) {
      std::vector<float> row;
      for (int64_t i = begin; i < end; ++i) {
        row.assign(dist.begin() + i * n, dist.begin() + (i + 1) * n);
        std::partial_sort(row.begin(), row.begin() + m, row.end());
        float sum = 0.f;
        for (int64_t t = 0; t < m; ++t) sum += row[t] * row[t];
        density[i] = std::exp(-sum / static_cast<float>(m));
      }
    });
    const float dmax = *std::max_element(dist.begin(), dist.end());
    score.resize(n);
    for (int64_t i = 0; i < n; ++i) {
      float delta = std::numeric_limits<float>::infinity();
      bool any = false;
      for (int64_t j = 0; j < n; ++j) {
        if (density[j] > density[i] || (density[j] == density[i] && j < i)) {
          delta = std::min(delta, dist[i * n + j]);
          any = true;
        }
      }
      score[i] = density[i] * (any ? delta : dmax);
    }
    order.resize(n);
    for (int64_t i = 0; i < n; ++i) order[i] = i;
    std::stable_sort(order.begin(), order.end(), [&](int64_t p, int64_t q) { return score[p] > score[q]; });
    slot_of.assign(static_cast<size_t>(n), -1);
    for (int64_t t = 0; t < c; ++t) slot_of[order[t]] = t;
    int64_t* a = assign + b * tokens;
    std::vector<int64_t> count(static_cast<size_t>(c), 0);
    acc.assign(static_cast<size_t>(c * dim), 0.f);
    for (int64_t i = 0; i < n; ++i) {
      int64_t s = slot_of[i];
      if (s < 0) {
        s = 0;
        for (int64_t t = 1; t < c; ++t) {
          if (dist[i * n + order[t]] < dist[i * n + order[s]]) s = t;
        }
      }
      a[i] = s;
      ++count[s];
      for (int64_t e = 0; e < dim; ++e) acc[s * dim + e] += values[i * dim + e];
    }
    for (int64_t t = 0; t < c; ++t) {
      for (int64_t e = 0; e < dim; ++e) acc[t * dim + e] /= static_cast<float>(count[t]);
      store_row(acc.data() + t * dim, elem, dim, item_row_ptr(merged, b, t));
      centre[b * clusters + t] = order[t];
    }
  }
  return {merged, assignment, centers};
}

}  // namespace mrprune::cpu

STABLE_TORCH_LIBRARY_IMPL(mrprune, CPU, m) {
  m.impl("_density_peak_merge_cpu", TORCH_BOX(&mrprune::cpu::density_peak_merge_cpu));
}
