// graph_scores on the CPU: features to (w^T P^t) / degree with ONE pass over the upper triangle of the Gram, in the
// features' own precision, and O(N D + edges) memory. Spec: mrprune.reference.graph_scores.
//
// The thresholded softmax graph is sparse: row i of P is exp(z_ij - m_i) / l_i on its edges and the same constant
// f_i = exp(-5000 - m_i) / l_i everywhere else, and f_i is exactly 0 in float32 as soon as the row has an edge with a
// logit above about -4900 (its self-edge, for the official threshold and temperature). So
//   (mass^T P)_j = sum_{i: ij edge} mass_i (p_ij - f_i) + sum_i mass_i f_i,
// a sparse product plus one constant, exact for any f. The pass over the Gram tiles (each unordered pair once,
// thresholded as it is computed) collects the edges; the graph is symmetric (S is bitwise symmetric), so the column
// list of j is its row list. Each row's softmax statistics are then summed over its edges in column order, and the
// t propagation steps run on the edge lists: G-Prune's t = 5 costs about what t = 1 does.
//
// Features whose exact products are the slow ones (float32, float16) are screened first where the CPU has a cheaper
// approximation (gram.h, Screen: bfloat16 AMX or int8 VNNI products): only the pairs that can reach the threshold are
// computed exactly, with the same bits.
//
// Edge lists larger than the workspace budget (a graph far denser than image features give) switch to streaming:
// one pass of full Gram rows for the statistics, then one per propagation step, still without an N x N matrix.
#include "mrprune/cpu/gram.h"

namespace mrprune::cpu {
namespace {

struct Edge {
  int32_t i, j;
  float logit;
};

struct Entry {
  int32_t col;
  float value;  // the logit z, then p - f of the row it came from
};

// Bytes per unordered edge at the peak: the found list plus two directed entries (and 8 bytes of headroom).
constexpr int64_t kBytesPerEdge = sizeof(Edge) + 2 * sizeof(Entry) + 8;

struct RowSoftmax {
  std::vector<float> max_logit, denominator, fill, degree;
  explicit RowSoftmax(int64_t n) : max_logit(n), denominator(n), fill(n), degree(n) {}
};

// Sparse path: false when the edges exceed the budget (nothing is written then).
bool scores_from_edges(const RowMatrix& x, const float* inv, const float* weights, float thr, float temp,
                       int64_t iterations, float* out) {
  const int64_t n = x.rows;
  const UpperTiles tiles(x);
  const int64_t max_edges = workspace_budget(x) / kBytesPerEdge;
  // One edge list per block, on the grid of row tiles x column blocks.
  const int64_t row_tiles = (n + tiles.rows_per_tile() - 1) / tiles.rows_per_tile();
  const int64_t col_blocks = (n + kTileCols - 1) / kTileCols;
  std::vector<std::vector<Edge>> found(row_tiles * col_blocks);
  std::atomic<int64_t> total{0};
  std::atomic<bool> overflow{false};
  // The edges of one block (need: the pairs a screen left in, or nullptr for all).
  const auto collect = [&](int64_t i0, int64_t m, int64_t j0, int64_t cols, const float* raw, int64_t ld,
                           const uint8_t* need, int64_t) {
    std::vector<Edge>& mine = found[(i0 / tiles.rows_per_tile()) * col_blocks + j0 / kTileCols];
    const size_t before = mine.size();
    float z;
    for (int64_t r = 0; r < m; ++r) {
      const int64_t i = i0 + r, c0 = std::max<int64_t>(0, i - j0);
      for_each_at_least(raw + r * ld + c0, inv + j0 + c0, inv[i], cols - c0, thr, [&](int64_t c, float s) {
        if (need != nullptr && !need[r * ld + c0 + c]) return;
        if (is_edge(s, thr, temp, &z)) mine.push_back({static_cast<int32_t>(i), static_cast<int32_t>(j0 + c0 + c), z});
      });
    }
    if (total.fetch_add(static_cast<int64_t>(mine.size() - before)) > max_edges) overflow = true;
  };
  const Screen screen(x, inv, thr);
  if (screen.active()) {
    tiles.visit_screened(screen, inv, collect, &overflow);
  } else {
    tiles.visit([&](int64_t i0, int64_t m, int64_t j0, int64_t cols, const float* raw, int64_t ld,
                    int64_t slot) { collect(i0, m, j0, cols, raw, ld, nullptr, slot); },
                &overflow);
  }
  if (overflow) return false;

  // Both directions of every edge, each row in column order (a fixed order whatever the thread count), without a
  // sort: row x holds first its pairs (i, x) with i < x ("mirrors", from the blocks of x's column block in row-tile
  // order, each block row by row: ascending i), then its own pairs (x, j), j >= x (from its row tile's blocks in
  // column order: ascending j). Both halves are counted and placed in parallel: rows by row tile, mirrors by column
  // block.
  // each_own(fn): fn(e) for every edge, in parallel over row tiles (each row's own pairs in order); each_mirror(fn):
  // fn(e) for every edge off the diagonal, in parallel over column blocks (each row's mirrors in order).
  const auto block = [&](int64_t t, int64_t cb) -> const std::vector<Edge>& { return found[t * col_blocks + cb]; };
  const auto each_own = [&](const auto& fn) {
    torch::stable::parallel_for(0, row_tiles, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        for (int64_t cb = 0; cb < col_blocks; ++cb) {
          for (const Edge& e : block(t, cb)) fn(e);
        }
      }
    });
  };
  const auto each_mirror = [&](const auto& fn) {
    torch::stable::parallel_for(0, col_blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t cb = begin; cb < end; ++cb) {
        for (int64_t t = 0; t < row_tiles; ++t) {
          for (const Edge& e : block(t, cb)) {
            if (e.j != e.i) fn(e);
          }
        }
      }
    });
  };
  std::vector<int64_t> mirrors(n, 0), owns(n, 0);
  each_own([&](const Edge& e) { ++owns[e.i]; });
  each_mirror([&](const Edge& e) { ++mirrors[e.j]; });
  std::vector<int64_t> offset(n + 1, 0);
  for (int64_t i = 0; i < n; ++i) {
    offset[i + 1] = offset[i] + mirrors[i] + owns[i];
    owns[i] = offset[i] + mirrors[i];  // now the cursors of the two halves
    mirrors[i] = offset[i];
  }
  std::vector<Entry> entries(static_cast<size_t>(offset[n]));
  each_own([&](const Edge& e) { entries[owns[e.i]++] = {e.j, e.logit}; });
  each_mirror([&](const Edge& e) { entries[mirrors[e.j]++] = {e.i, e.logit}; });
  std::vector<std::vector<Edge>>().swap(found);
  RowSoftmax soft(n);
  torch::stable::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const Entry* row = entries.data() + offset[i];
      const int64_t edges = offset[i + 1] - offset[i];
      const EdgeRowStats stats = edge_stats(n, [&](const auto& fn) {
        for (int64_t e = 0; e < edges; ++e) fn(row[e].value);
      });
      soft.max_logit[i] = stats.max_logit;
      soft.denominator[i] = stats.denominator;
      soft.fill[i] = stats.fill / stats.denominator;
      soft.degree[i] = stats.degree(n);
    }
  });
  // Entry (j, col i) of row j is edge ij: store p_ij - f_i (row i's softmax).
  torch::stable::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      for (int64_t e = offset[j]; e < offset[j + 1]; ++e) {
        const int64_t i = entries[e].col;
        entries[e].value = std::exp(entries[e].value - soft.max_logit[i]) / soft.denominator[i] - soft.fill[i];
      }
    }
  });
  std::vector<float> mass(weights, weights + n), next(n);
  for (int64_t step = 0; step < iterations; ++step) {
    float constant = 0.f;
    for (int64_t i = 0; i < n; ++i) constant += mass[i] * soft.fill[i];
    torch::stable::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        float sum = 0.f;
        for (int64_t e = offset[j]; e < offset[j + 1]; ++e) sum += mass[entries[e].col] * entries[e].value;
        next[j] = sum + constant;
      }
    });
    mass.swap(next);
  }
  for (int64_t j = 0; j < n; ++j) out[j] = mass[j] / soft.degree[j];
  return true;
}

// Streaming path: full Gram rows, recomputed per pass (1 + t passes), online softmax statistics.
void scores_streaming(const RowMatrix& x, const float* inv, const float* weights, float thr, float temp,
                      int64_t iterations, float* out) {
  const int64_t n = x.rows;
  std::vector<float> max_logit(n, -std::numeric_limits<float>::infinity()), sum(n, 0.f);
  std::vector<int64_t> edges(n, 0);
  // Rows of a row tile are visited by one thread, column blocks in ascending order: a fixed order per row.
  visit_cross_tiles(x, x, [&](int64_t i0, int64_t m, int64_t j0, int64_t cols, const float* raw, int64_t ld) {
    float z;
    for (int64_t r = 0; r < m; ++r) {
      const int64_t i = i0 + r;
      for (int64_t c = 0; c < cols; ++c) {
        if (!is_edge(raw[r * ld + c] * (inv[i] * inv[j0 + c]), thr, temp, &z)) continue;
        ++edges[i];
        if (z > max_logit[i]) {
          sum[i] = sum[i] * std::exp(max_logit[i] - z) + 1.f;
          max_logit[i] = z;
        } else {
          sum[i] += std::exp(z - max_logit[i]);
        }
      }
    }
  });
  RowSoftmax soft(n);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t non_edges = n - edges[i];
    float m = max_logit[i];
    if (non_edges > 0) m = std::max(m, kEdgeFillLogit);
    const float fill = non_edges > 0 ? std::exp(kEdgeFillLogit - m) : 0.f;
    const float rescaled = edges[i] > 0 ? sum[i] * std::exp(max_logit[i] - m) : 0.f;
    soft.max_logit[i] = m;
    soft.denominator[i] = rescaled + static_cast<float>(non_edges) * fill;
    soft.fill[i] = fill / soft.denominator[i];
    soft.degree[i] = static_cast<float>(edges[i] > 0 ? edges[i] : n);
  }
  std::vector<float> mass(weights, weights + n), next(n);
  for (int64_t step = 0; step < iterations; ++step) {
    std::fill(next.begin(), next.end(), 0.f);
    // Block rows j, columns i: raw_ji == raw_ij bitwise, so next_j = sum_i mass_i P_ij is summed by j's thread.
    visit_cross_tiles(x, x, [&](int64_t j0, int64_t m, int64_t i0, int64_t cols, const float* raw, int64_t ld) {
      float z;
      for (int64_t r = 0; r < m; ++r) {
        const int64_t j = j0 + r;
        float acc = next[j];
        for (int64_t c = 0; c < cols; ++c) {
          const int64_t i = i0 + c;
          const float s = raw[r * ld + c] * (inv[i] * inv[j]);
          const float p = is_edge(s, thr, temp, &z) ? std::exp(z - soft.max_logit[i]) / soft.denominator[i]
                                                    : soft.fill[i];
          acc += mass[i] * p;
        }
        next[j] = acc;
      }
    });
    mass.swap(next);
  }
  for (int64_t j = 0; j < n; ++j) out[j] = mass[j] / soft.degree[j];
}

}  // namespace

Tensor graph_scores_cpu(Tensor features, Tensor lengths, std::optional<Tensor> weights, double threshold,
                        double temperature, int64_t iterations) {
  check_features(features, "features");
  if (weights.has_value()) check_tensor(*weights, "weights", 2, ScalarType::Float);
  const int64_t batch = features.size(0), tokens = features.size(1);
  check_lengths(lengths, "lengths", batch, tokens);
  if (weights.has_value()) check_sizes(*weights, "weights", {batch, tokens});
  STD_TORCH_CHECK(tokens <= std::numeric_limits<int32_t>::max(), "mrprune: graph_scores supports N < 2^31");
  Tensor scores = torch::stable::new_zeros(features, {batch, tokens}, ScalarType::Float);
  const int64_t* len = lengths.const_data_ptr<int64_t>();
  const float thr = static_cast<float>(threshold), temp = static_cast<float>(temperature);
  std::vector<float> norms, inv;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t n = len[b];
    if (n == 0) continue;
    const RowMatrix x = item_rows(features, b, n);
    norms.resize(n);
    inv.resize(n);
    row_norms(x, norms.data(), inv.data());
    const float* w = weights.has_value() ? weights->const_data_ptr<float>() + b * tokens : norms.data();
    float* out = scores.mutable_data_ptr<float>() + b * tokens;
    if (!scores_from_edges(x, inv.data(), w, thr, temp, iterations, out)) {
      scores_streaming(x, inv.data(), w, thr, temp, iterations, out);
    }
  }
  return scores;
}

}  // namespace mrprune::cpu

STABLE_TORCH_LIBRARY_IMPL(mrprune, CPU, m) { m.impl("_graph_scores_cpu", TORCH_BOX(&mrprune::cpu::graph_scores_cpu)); }
