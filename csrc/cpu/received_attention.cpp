// received_attention on the CPU: the attention each token receives, head-averaged column sums of
// softmax(q k^T * scale), without an N x N buffer. Per item and head, a block of query rows is multiplied with the
// keys its segments can reach (one GEMM), turned into softmax rows in place (whole rows are in the block, so the row
// statistics need no second pass), and summed into the columns by a GEMV: O(threads * block * N + B * H * N)
// memory.
// Spec: mrprune.reference.received_attention.
#include <optional>

#include "mrprune/cpu/common.h"

namespace mrprune::cpu {
namespace {

// Query rows per block: a float32 [rows, N] tile of at most 16 MiB (and at least 16 rows).
int64_t row_block(int64_t n) { return std::clamp<int64_t>((int64_t{1} << 22) / std::max<int64_t>(n, 1), 16, 256); }

// The contiguous key range [lo, hi) holding every key whose segment id lies in [smallest, largest] of the query
// rows [r0, r1): all keys those rows may attend (tight when ids are sorted, as Qwen2.5-VL's blocks are).
void key_span(const int64_t* seg, int64_t n, int64_t r0, int64_t r1, int64_t* lo, int64_t* hi) {
  const auto [smallest, largest] = std::minmax_element(seg + r0, seg + r1);
  *lo = n;
  *hi = 0;
  for (int64_t j = 0; j < n; ++j) {
    if (*smallest <= seg[j] && seg[j] <= *largest) {
      *lo = std::min(*lo, j);
      *hi = j + 1;
    }
  }
}

}  // namespace

Tensor received_attention_cpu(Tensor q, Tensor k, Tensor lengths, std::optional<Tensor> segment_ids,
                              std::optional<double> scale) {
  check_tensor(q, "q", 4, ScalarType::Float);
  check_tensor(k, "k", 4, ScalarType::Float);
  const int64_t batch = q.size(0), heads = q.size(1), tokens = q.size(2), dim = q.size(3);
  check_sizes(k, "k", {batch, heads, tokens, dim});
  check_lengths(lengths, "lengths", batch, tokens);
  const int64_t* seg_all = nullptr;
  if (segment_ids.has_value()) {
    check_tensor(*segment_ids, "segment_ids", 2, ScalarType::Long);
    check_sizes(*segment_ids, "segment_ids", {batch, tokens});
    seg_all = segment_ids->const_data_ptr<int64_t>();
  }
  const float factor = static_cast<float>(scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(dim)));
  Tensor out = torch::stable::new_empty(q, {batch, tokens}, ScalarType::Float);
  float* scores = out.mutable_data_ptr<float>();
  const int64_t* len = lengths.const_data_ptr<int64_t>();
  const int64_t block = row_block(tokens);
  // One task per (item, head), each with its own tile and its own column sums (a [B, H, N] buffer), reduced over
  // the heads in order at the end: few parallel regions (they are what costs on a loaded machine), no atomics, and
  // the same result for any thread count. GEMMs inside a task run single-threaded (nested parallelism).
  Workspace partial = workspace(batch * heads * tokens);
  torch::stable::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    Workspace tile = workspace(block * tokens), column = workspace(tokens);
    std::vector<float> ones(static_cast<size_t>(block), 1.f);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / heads, n = len[b];
      const int64_t* seg = seg_all != nullptr ? seg_all + b * tokens : nullptr;
      const float* qh = q.const_data_ptr<float>() + task * tokens * dim;
      const float* kh = k.const_data_ptr<float>() + task * tokens * dim;
      float* received = partial.get() + task * tokens;
      std::fill(received, received + tokens, 0.f);
      for (int64_t r0 = 0; r0 < n; r0 += block) {
        const int64_t rows = std::min(block, n - r0);
        int64_t lo = 0, hi = n;
        if (seg != nullptr) key_span(seg, n, r0, r0 + rows, &lo, &hi);
        const int64_t cols = hi - lo;
        float* s = tile.get();
        matmul_into(float_view(qh + r0 * dim, rows, dim, dim, 1), float_view(kh + lo * dim, dim, cols, 1, dim),
                    float_view(s, rows, cols, cols, 1));
        for (int64_t i = 0; i < rows; ++i) {
          float* row = s + i * cols;
          const int64_t own = seg != nullptr ? seg[r0 + i] : 0;
          float top = -std::numeric_limits<float>::infinity();
          for (int64_t c = 0; c < cols; ++c) {
            const bool reachable = seg == nullptr || seg[lo + c] == own;
            row[c] = reachable ? row[c] * factor : -std::numeric_limits<float>::infinity();
            top = std::max(top, row[c]);
          }
          float total = 0.f;  // the row attends at least itself, so top is finite and total >= 1
          for (int64_t c = 0; c < cols; ++c) total += (row[c] = std::exp(row[c] - top));
          const float inv = 1.f / total;
          for (int64_t c = 0; c < cols; ++c) row[c] *= inv;
        }
        matmul_into(float_view(ones.data(), 1, rows, rows, 1), float_view(s, rows, cols, cols, 1),
                    float_view(column.get(), 1, cols, cols, 1));
        for (int64_t c = 0; c < cols; ++c) received[lo + c] += column[c];
      }
    }
  });
  const float inv_heads = 1.f / static_cast<float>(std::max<int64_t>(heads, 1));
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t j = 0; j < tokens; ++j) {
      float sum = 0.f;
      for (int64_t h = 0; h < heads; ++h) sum += partial[(b * heads + h) * tokens + j];
      scores[b * tokens + j] = j < len[b] ? sum * inv_heads : 0.f;
    }
  }
  return out;
}

}  // namespace mrprune::cpu

STABLE_TORCH_LIBRARY_IMPL(mrprune, CPU, m) {
  m.impl("_received_attention_cpu", TORCH_BOX(&mrprune::cpu::received_attention_cpu));
}
