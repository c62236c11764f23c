// greedy_residual_select on the CPU: all k picks of every item in one call, in one of two equivalent forms.
//
//  * gram  (weighted pivoted partial Cholesky of G = X X^T): one symmetric GEMM up front (compute-bound BLAS), then
//          per pick c_t = (G[j,:] - sum_m C[m,j] C[m,:]) / sqrt(e_j) and e -= c_t^2, i.e. O(n t) per step on data
//          that stays in cache.
//  * basis (Gram-Schmidt, as the ResPrune paper describes): per pick, orthogonalise x_j twice against the basis Q
//          and update e -= (X q)^2, i.e. one memory-bound GEMV over all of X per step.
// Which is faster depends on n, k and D (see choose_gram). Spec: mrprune.reference.greedy_residual_select.
#include "mrprune/cpu/gram.h"

#include <numeric>
#include <string>

namespace mrprune::cpu {
namespace {

// Cost model, in multiply-adds: gram = n^2 D / 2 at GEMM speed + n k^2 / 2 streamed (the factor updates);
// basis = n k D streamed (one GEMV over X per pick) + k^2 D (re-orthogonalisation). A float32 GEMM runs about
// kGemmSpeedup times faster per multiply-add than the streamed loops on the development CPU (2-core EPYC, MKL), so
// gram wins when n D / kGemmSpeedup + k^2 < k D, e.g. k = 640 of n = 2880 at D = 4096 (LLaVA-NeXT), but not at
// D = 512 or for k = 64 of n = 16k. A Gram over 1 GiB is never built.
bool choose_gram(const std::string& algorithm, int64_t n, int64_t k, int64_t dim) {
  if (algorithm == "gram") return true;
  if (algorithm == "basis") return false;
  constexpr int64_t kGemmSpeedup = 16;
  constexpr int64_t kMaxGramBytes = int64_t{1} << 30;
  if (n * n * static_cast<int64_t>(sizeof(float)) > kMaxGramBytes) return false;
  return n * dim / kGemmSpeedup + k * k < k * dim;
}

// The next pivot: argmax over unpicked tokens of gate * energy, ties to the lower index; -1 when no score is > 0.
int64_t next_pivot(const float* energy, const float* gate, const std::vector<uint8_t>& picked, int64_t n) {
  int64_t best = -1;
  float best_score = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    if (picked[i]) continue;
    const float score = (gate != nullptr ? gate[i] : 1.f) * energy[i];
    if (score > best_score) best = i, best_score = score;
  }
  return best;
}

#ifdef MRPRUNE_X86_AVX512
// subtract_factors for the four rows at `rows` (row stride n).
MRPRUNE_AVX512 void subtract_four_avx512(const float* rows, int64_t n, int64_t j, int64_t begin, int64_t end,
                                         float* row) {
  const __m512 c0 = _mm512_set1_ps(rows[j]), c1 = _mm512_set1_ps(rows[n + j]);
  const __m512 c2 = _mm512_set1_ps(rows[2 * n + j]), c3 = _mm512_set1_ps(rows[3 * n + j]);
  for (int64_t i = begin; i < end; i += 16) {
    const __mmask16 mask =
        end - i >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (end - i)) - 1);
    __m512 r = _mm512_maskz_loadu_ps(mask, row + i);
    r = _mm512_fnmadd_ps(c0, _mm512_maskz_loadu_ps(mask, rows + i), r);
    r = _mm512_fnmadd_ps(c1, _mm512_maskz_loadu_ps(mask, rows + n + i), r);
    r = _mm512_fnmadd_ps(c2, _mm512_maskz_loadu_ps(mask, rows + 2 * n + i), r);
    r = _mm512_fnmadd_ps(c3, _mm512_maskz_loadu_ps(mask, rows + 3 * n + i), r);
    _mm512_mask_storeu_ps(row + i, mask, r);
  }
}
#endif

// e_i -= update_i^2, clamped at 0, and zeroed at or below tol * e0_i (spanned, so never a pivot).
void drop_energy(float* energy, const float* initial, const float* update, int64_t n, float tol) {
  for (int64_t i = 0; i < n; ++i) {
    const float e = std::max(energy[i] - update[i] * update[i], 0.f);
    energy[i] = e <= tol * initial[i] ? 0.f : e;
  }
}

struct ItemSelection {
  RowMatrix x;         // [n, dim], float32/bfloat16/float16
  const float* gate;   // [n] or nullptr
  int64_t n, dim, k, seed;
  float tol;
  int64_t* indices;    // [k]
  float* energies;     // [k]
};

// row[i] -= factor[m, j] * factor[m, i] for m < rank, i in [begin, end), m ascending per entry, each step one fused
// multiply-add (the plain loop below is contracted to one under -mfma, the default build: the same bits). The factor
// rows stream from the last-level cache (up to k n floats per step): with AVX-512, four rows per pass over the
// entries, reading and writing each entry of `row` once per four factor rows instead of once per row.
void subtract_factors(const float* factor, int64_t n, int64_t j, int64_t rank, int64_t begin, int64_t end,
                      float* row) {
  int64_t m = 0;
#ifdef MRPRUNE_X86_AVX512
  if (dots::isa().avx512) {
    for (; m + 4 <= rank; m += 4) subtract_four_avx512(factor + m * n, n, j, begin, end, row);
  }
#endif
  for (; m < rank; ++m) {
    const float coef = factor[m * n + j];
    const float* previous = factor + m * n;
    for (int64_t i = begin; i < end; ++i) row[i] -= coef * previous[i];
  }
}

// Pivoted partial Cholesky of x x^T. gram: [n, n] workspace, factor: [k, n] workspace.
void select_gram(const ItemSelection& item, float* gram, float* factor, std::vector<float>& energy,
                 const std::vector<float>& initial, std::vector<uint8_t>& picked, int64_t& count) {
  const int64_t n = item.n;
  raw_gram(item.x, gram, n);
  int64_t rank = 0;
  for (; count < std::min(item.k, n); ++count) {
    const int64_t j = (count == 0 && item.seed >= 0) ? item.seed : next_pivot(energy.data(), item.gate, picked, n);
    if (j < 0) return;
    item.indices[count] = j;
    item.energies[count] = energy[j];
    picked[j] = 1;
    if (energy[j] > 0.f) {
      float* row = factor + rank * n;
      const float inv_pivot = 1.f / std::sqrt(energy[j]);
      torch::stable::parallel_for(0, n, 512, [&](int64_t begin, int64_t end) {
        std::copy(gram + j * n + begin, gram + j * n + end, row + begin);
        subtract_factors(factor, n, j, rank, begin, end, row);
        for (int64_t i = begin; i < end; ++i) row[i] *= inv_pivot;
        drop_energy(energy.data() + begin, initial.data() + begin, row + begin, end - begin, item.tol);
      });
      ++rank;
    }
    energy[j] = 0.f;
  }
}

// out[r] = rows[r] . v for r < count, parallel over rows. Hand-written rather than BLAS GEMV: MKL's GEMV rounds
// differently with the data's alignment, which would make an item's picks depend on its place in the batch.
void project_rows(const float* rows, int64_t count, int64_t dim, const float* v, float* out) {
  torch::stable::parallel_for(0, count, 32, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) out[r] = dot(rows + r * dim, v, dim);
  });
}

// The same for feature rows in their stored precision (a fixed 16-lane order per row, see dot_kernels.h).
void project_rows(const RowMatrix& rows, const float* v, float* out) {
  torch::stable::parallel_for(0, rows.rows, 32, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) out[r] = dots::dot_vec(rows.row(r), rows.elem, v, rows.d);
  });
}

// Gram-Schmidt with an explicit orthonormal basis. basis: [k, dim] workspace.
void select_basis(const ItemSelection& item, float* basis, std::vector<float>& energy, const std::vector<float>& initial,
                  std::vector<uint8_t>& picked, int64_t& count) {
  const int64_t n = item.n, dim = item.dim;
  std::vector<float> residual(dim), coefs(item.k), projection(n);
  int64_t rank = 0;
  for (; count < std::min(item.k, n); ++count) {
    const int64_t j = (count == 0 && item.seed >= 0) ? item.seed : next_pivot(energy.data(), item.gate, picked, n);
    if (j < 0) return;
    item.indices[count] = j;
    item.energies[count] = energy[j];
    picked[j] = 1;
    if (energy[j] > 0.f) {
      for (int64_t c = 0; c < dim; ++c) residual[c] = dots::load(item.x.row(j), item.x.elem, c);
      for (int pass = 0; pass < 2 && rank > 0; ++pass) {  // "twice is enough" re-orthogonalisation
        project_rows(basis, rank, dim, residual.data(), coefs.data());
        for (int64_t m = 0; m < rank; ++m) {
          for (int64_t c = 0; c < dim; ++c) residual[c] -= coefs[m] * basis[m * dim + c];
        }
      }
      const float norm = std::sqrt(dot(residual.data(), residual.data(), dim));
      float* direction = basis + rank * dim;
      for (int64_t c = 0; c < dim; ++c) direction[c] = residual[c] / norm;
      project_rows(item.x, direction, projection.data());
      drop_energy(energy.data(), initial.data(), projection.data(), n, item.tol);
      ++rank;
    }
    energy[j] = 0.f;
  }
}

// Rank exhausted (or the remaining gates are 0): the unpicked tokens by descending gate, then ascending index.
void fill_remaining(const ItemSelection& item, const std::vector<uint8_t>& picked, int64_t count) {
  std::vector<int64_t> rest;
  for (int64_t i = 0; i < item.n; ++i) {
    if (!picked[i]) rest.push_back(i);
  }
  if (item.gate != nullptr) {
    std::stable_sort(rest.begin(), rest.end(), [&](int64_t a, int64_t b) { return item.gate[a] > item.gate[b]; });
  }
  for (int64_t r = 0; count < std::min(item.k, item.n); ++count, ++r) item.indices[count] = rest[r];
}

}  // namespace

std::tuple<Tensor, Tensor> greedy_residual_select_cpu(Tensor features, Tensor lengths, int64_t k,
                                                      std::optional<Tensor> gate, std::optional<Tensor> seed,
                                                      double exhaustion_tol, std::string algorithm) {
  check_features(features, "features");
  if (gate.has_value()) check_tensor(*gate, "gate", 2, ScalarType::Float);
  if (seed.has_value()) check_tensor(*seed, "seed", 1, ScalarType::Long);
  const int64_t batch = features.size(0), tokens = features.size(1), dim = features.size(2);
  check_lengths(lengths, "lengths", batch, tokens);
  if (gate.has_value()) check_sizes(*gate, "gate", {batch, tokens});
  if (seed.has_value()) check_sizes(*seed, "seed", {batch});
  STD_TORCH_CHECK(0 <= k && k <= tokens, "mrprune: k must lie in [0, N]");
  STD_TORCH_CHECK(algorithm == "auto" || algorithm == "gram" || algorithm == "basis",
                  "mrprune: algorithm must be 'auto', 'gram' or 'basis'");
  Tensor indices = torch::stable::new_empty(features, {batch, k}, ScalarType::Long);
  Tensor energies = torch::stable::new_zeros(features, {batch, k}, ScalarType::Float);
  int64_t* out_indices = indices.mutable_data_ptr<int64_t>();
  std::fill(out_indices, out_indices + batch * k, int64_t{-1});
  const int64_t* len = lengths.const_data_ptr<int64_t>();
  std::vector<float> gram, factor, basis, energy, initial;
  std::vector<uint8_t> picked;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t n = len[b];
    const ItemSelection item{item_rows(features, b, n),
                             gate.has_value() ? gate->const_data_ptr<float>() + b * tokens : nullptr,
                             n,
                             dim,
                             k,
                             seed.has_value() ? seed->const_data_ptr<int64_t>()[b] : -1,
                             static_cast<float>(exhaustion_tol),
                             out_indices + b * k,
                             energies.mutable_data_ptr<float>() + b * k};
    initial.resize(n);
    torch::stable::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) initial[i] = dots::self_dot(item.x.row(i), item.x.elem, dim);
    });
    energy = initial;
    picked.assign(n, 0);
    int64_t count = 0;
    if (choose_gram(algorithm, n, std::min(k, n), dim)) {
      gram.resize(static_cast<size_t>(n * n));
      factor.resize(static_cast<size_t>(std::min(k, n) * n));
      select_gram(item, gram.data(), factor.data(), energy, initial, picked, count);
    } else {
      basis.resize(static_cast<size_t>(std::min(k, n) * dim));
      select_basis(item, basis.data(), energy, initial, picked, count);
    }
    fill_remaining(item, picked, count);
  }
  return {indices, energies};
}

}  // namespace mrprune::cpu

STABLE_TORCH_LIBRARY_IMPL(mrprune, CPU, m) {
  m.impl("_greedy_residual_select_cpu", TORCH_BOX(&mrprune::cpu::greedy_residual_select_cpu));
}
