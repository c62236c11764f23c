// attention_rows on the CPU: head-averaged softmax rows of a few queries against all keys, from q and k in their own
// dtype (float32 accumulation in the Gram tiles of gram.h). One task per (item, head) computes its M x N logits
// tile by tile and turns each row into probabilities over the keys it may attend; a second pass averages the heads
// in a fixed order (and, with reduce, the real rows). Spec: mrprune.reference.attention_rows.
#include "mrprune/cpu/merge.h"

namespace mrprune::cpu {

Tensor attention_rows_cpu(Tensor q, Tensor k, Tensor key_mask, std::optional<Tensor> query_positions,
                          std::optional<double> scale, bool reduce) {
  STD_TORCH_CHECK(q.is_cpu() && k.is_cpu() && q.dim() == 4 && k.dim() == 4, "mrprune: q and k must be 4-D CPU");
  STD_TORCH_CHECK(q.is_contiguous() && k.is_contiguous(), "mrprune: q and k must be contiguous");
  STD_TORCH_CHECK(q.scalar_type() == k.scalar_type(), "mrprune: q and k must share a dtype");
  const dots::Elem elem = elem_of(q.scalar_type());
  const int64_t batch = q.size(0), heads = q.size(1), rows = q.size(2), dim = q.size(3);
  const int64_t kv_heads = k.size(1), tokens = k.size(2);
  check_sizes(k, "k", {batch, kv_heads, tokens, dim});
  STD_TORCH_CHECK(kv_heads >= 1 && heads % kv_heads == 0, "mrprune: H must be a multiple of H_kv");
  check_tensor(key_mask, "key_mask", 2, ScalarType::Bool);
  check_sizes(key_mask, "key_mask", {batch, tokens});
  const int64_t* position = nullptr;
  if (query_positions.has_value()) {
    check_tensor(*query_positions, "query_positions", 2, ScalarType::Long);
    check_sizes(*query_positions, "query_positions", {batch, rows});
    position = query_positions->const_data_ptr<int64_t>();
  }
  const float logit_scale = static_cast<float>(scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(dim)));
  const bool* mask = key_mask.const_data_ptr<bool>();
  const int64_t group = heads / std::max<int64_t>(kv_heads, 1), size = dots::elem_size(elem);
  // per-head probabilities [B, H, M, N]: M is a handful of rows, so this stays small
  Workspace probs = workspace(batch * heads * rows * tokens);
  torch::stable::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    TileDots dots(elem);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / heads, h = task % heads;
      const RowMatrix qm{static_cast<const char*>(q.const_data_ptr()) + (b * heads + h) * rows * dim * size, elem,
                         rows, dim, dim};
      const RowMatrix km{static_cast<const char*>(k.const_data_ptr()) + (b * kv_heads + h / group) * tokens * dim * size,
                         elem, tokens, dim, dim};
      float* p = probs.get() + task * rows * tokens;
      for (int64_t i0 = 0; i0 < rows; i0 += kTileRows) {
        const int64_t m = std::min(kTileRows, rows - i0);
        for (int64_t j0 = 0; j0 < tokens; j0 += kTileCols) {
          const int64_t n = std::min(kTileCols, tokens - j0);
          const float* raw = dots.compute(qm, i0, m, km, j0, n);
          for (int64_t r = 0; r < m; ++r) {
            for (int64_t c = 0; c < n; ++c) p[(i0 + r) * tokens + j0 + c] = raw[r * TileDots::ld() + c] * logit_scale;
          }
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        float* row = p + r * tokens;
        const int64_t last = position == nullptr ? tokens - 1 : position[b * rows + r];  // -1: a padded row
        const bool* allowed = mask + b * tokens;
        float top = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j <= last; ++j) {
          if (allowed[j]) top = std::max(top, row[j]);
        }
        if (top == -std::numeric_limits<float>::infinity()) {  // no key: a zero row
          std::fill(row, row + tokens, 0.f);
          continue;
        }
        float total = 0.f;
        for (int64_t j = 0; j < tokens; ++j) {
          row[j] = (j <= last && allowed[j]) ? std::exp(row[j] - top) : 0.f;
          total += row[j];
        }
        for (int64_t j = 0; j < tokens; ++j) row[j] /= total;
      }
    }
  });
  Tensor out = reduce ? torch::stable::new_zeros(q, {batch, tokens}, ScalarType::Float)
                      : torch::stable::new_zeros(q, {batch, rows, tokens}, ScalarType::Float);
  float* o = out.mutable_data_ptr<float>();
  torch::stable::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> mean(static_cast<size_t>(tokens));
    for (int64_t b = begin; b < end; ++b) {
      int64_t real = 0;
      for (int64_t r = 0; r < rows; ++r) {
        std::fill(mean.begin(), mean.end(), 0.f);
        for (int64_t h = 0; h < heads; ++h) {
          const float* p = probs.get() + ((b * heads + h) * rows + r) * tokens;
          for (int64_t j = 0; j < tokens; ++j) mean[j] += p[j];
        }
        for (int64_t j = 0; j < tokens; ++j) mean[j] /= static_cast<float>(heads);
        if (!reduce) {
          std::copy(mean.begin(), mean.end(), o + (b * rows + r) * tokens);
        } else if (position == nullptr || position[b * rows + r] >= 0) {
          ++real;
          for (int64_t j = 0; j < tokens; ++j) o[b * tokens + j] += mean[j];
        }
      }
      if (reduce && real > 0) {
        for (int64_t j = 0; j < tokens; ++j) o[b * tokens + j] /= static_cast<float>(real);
      }
    }
  });
  return out;
}

}  // namespace mrprune::cpu

STABLE_TORCH_LIBRARY_IMPL(mrprune, CPU, m) {
  m.impl("_attention_rows_cpu", TORCH_BOX(&mrprune::cpu::attention_rows_cpu));
}
