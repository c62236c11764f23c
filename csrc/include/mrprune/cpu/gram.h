// Cosine Grams of feature rows in their stored precision (float32, bfloat16, float16), tile by tile.
//
// cos(x_i, x_j) = (x_i . x_j) * (inv_i * inv_j) with inv_i = 1 / max(||x_i||, 1e-12) in float32: the raw dot
// products come from gram_kernels.h (float32 accumulation, per-pair order), and the rows are never normalised (nor
// upcast) in half precision. Both factors are symmetric in i and j, so the cosine Gram is bitwise symmetric and
// identical tokens get identical rows.
//
// The n x n Gram is visited one tile pair at a time and only for column tiles at or right of the row tile (the upper
// triangle: half the multiply-adds); callers fuse their thresholding, statistics or selection into the visit, so no
// n x n matrix has to exist.
#pragma once

#include <array>
#include <atomic>
#include <cstdlib>
#include <string>

#include "mrprune/cpu/common.h"
#include "mrprune/cpu/gram_kernels.h"

namespace mrprune::cpu {

using gemm::RowMatrix;
using gemm::TileDots;

inline dots::Elem elem_of(ScalarType type) {
  switch (type) {
    case ScalarType::Float:
      return dots::Elem::kFloat32;
    case ScalarType::BFloat16:
      return dots::Elem::kBFloat16;
    case ScalarType::Half:
      return dots::Elem::kFloat16;
    default:
      STD_TORCH_CHECK(false, "mrprune: features must be float32, bfloat16 or float16 (the router converts others)");
  }
  return dots::Elem::kFloat32;
}

// features [B, N, D] (float32/bfloat16/float16, contiguous) and the router's contract.
inline void check_features(const Tensor& t, const char* name) {
  STD_TORCH_CHECK(t.is_cpu(), "mrprune: ", name, " must be a CPU tensor");
  STD_TORCH_CHECK(t.dim() == 3, "mrprune: ", name, " must be 3-D");
  elem_of(t.scalar_type());
  STD_TORCH_CHECK(t.is_contiguous(), "mrprune: ", name, " must be contiguous");
}

// Rows [0, n) of item b of features [B, N, D].
inline RowMatrix item_rows(const Tensor& features, int64_t b, int64_t n) {
  const dots::Elem elem = elem_of(features.scalar_type());
  const int64_t tokens = features.size(1), dim = features.size(2);
  const char* base = static_cast<const char*>(features.const_data_ptr()) + b * tokens * dim * dots::elem_size(elem);
  return RowMatrix{base, elem, n, dim, dim};
}

// norms[i] = ||x_i|| (float32, fixed order), inv[i] = 1 / max(||x_i||, 1e-12) (either may be nullptr).
inline void row_norms(const RowMatrix& x, float* norms, float* inv) {
  torch::stable::parallel_for(0, x.rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float norm = std::sqrt(dots::self_dot(x.row(i), x.elem, x.d));
      if (norms != nullptr) norms[i] = norm;
      if (inv != nullptr) inv[i] = 1.f / std::max(norm, kNormEps);
    }
  });
}

// b's tile operand packed once for all the tiles of a visit (in parallel over panels).
inline std::unique_ptr<gemm::PackedPanels> pack_panels(const RowMatrix& b) {
  auto packed = std::make_unique<gemm::PackedPanels>(b);
  torch::stable::parallel_for(0, packed->panels(), 4, [&](int64_t begin, int64_t end) { packed->pack(begin, end); });
  return packed;
}

// Edge lengths of the Gram tiles of the visits below. Tiles that transpose their own B operand (float32, converted
// halves) take 256 rows to spread that packing over twice the products (at N = 2304, D = 4096 float32 the packing
// was a quarter of the kernel time with 128 rows); with B packed ahead (bfloat16 pairs) 128 rows balance the threads
// better.
constexpr int64_t kTileRows = TileDots::kMaxRows;
constexpr int64_t kTileCols = TileDots::kMaxCols;
inline int64_t tile_rows(const RowMatrix& x) {
  const gemm::Mode mode = gemm::mode_for(x.elem, x.d);
  return mode.pairs || mode.amx ? kTileRows / 2 : kTileRows;
}

#ifdef MRPRUNE_X86_AVX512
// Bit c % 16 of masks[c / 16]: raw[c] * (inv_row * inv_cols[c]) >= cut, for c < n.
MRPRUNE_AVX512 inline void at_least_masks(const float* raw, const float* inv_cols, float inv_row, int64_t n,
                                          float cut, uint16_t* masks) {
  const __m512 row = _mm512_set1_ps(inv_row), bound = _mm512_set1_ps(cut);
  for (int64_t c = 0; c < n; c += 16) {
    const __mmask16 tail = n - c >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (n - c)) - 1);
    const __m512 scale = _mm512_mul_ps(row, _mm512_maskz_loadu_ps(tail, inv_cols + c));
    const __m512 cosine = _mm512_mul_ps(_mm512_maskz_loadu_ps(tail, raw + c), scale);
    masks[c / 16] = _mm512_mask_cmp_ps_mask(tail, cosine, bound, _CMP_GE_OQ);
  }
}
#endif

// Calls fn(c, s) in ascending c for every c < n with s = raw[c] * (inv_row * inv_cols[c]) >= cut (the cosine of a
// Gram block entry, rounded as everywhere else; NaN never passes): the thresholding scans of the Gram visits, most of
// whose entries lie below the cut.
template <class F>
inline void for_each_at_least(const float* raw, const float* inv_cols, float inv_row, int64_t n, float cut,
                              const F& fn) {
#ifdef MRPRUNE_X86_AVX512
  if (dots::isa().avx512) {
    uint16_t masks[(TileDots::kMaxCols + 15) / 16];
    for (int64_t c0 = 0; c0 < n; c0 += TileDots::kMaxCols) {
      const int64_t count = std::min(TileDots::kMaxCols, n - c0);
      at_least_masks(raw + c0, inv_cols + c0, inv_row, count, cut, masks);
      for (int64_t w = 0; w * 16 < count; ++w) {
        for (unsigned bits = masks[w]; bits != 0; bits &= bits - 1) {
          const int64_t c = c0 + w * 16 + __builtin_ctz(bits);
          fn(c, raw[c] * (inv_row * inv_cols[c]));
        }
      }
    }
    return;
  }
#endif
  for (int64_t c = 0; c < n; ++c) {
    const float s = raw[c] * (inv_row * inv_cols[c]);
    if (s >= cut) fn(c, s);
  }
}

// Screening float32 Gram tiles for a threshold rule (cos >= threshold) on CPUs with AMX. A bfloat16 copy of the rows
// gives every pair's cosine to within margin() in one cheap AMX pass; only the pairs whose screened cosine reaches
// cut() = threshold - margin() are computed exactly, by the float32 kernels (TileDots::compute_masked: the same bits
// as the full tile), so the thresholded results do not change by one bit. The bound: rounding to bfloat16 moves each
// value by at most 2^-9 of itself, so |x~ . y~ - x . y| <= (2^-8 + 2^-18) ||x|| ||y||; the screen's float32
// accumulation and the exact one each err by at most (d + 1) 2^-24 ||x|| ||y|| (recursive summation in any order);
// the inverse norms add a few ulps. What bfloat16 and AMX flush to zero (denormal values and products) changes a dot
// product by at most (d + sqrt(d) (||x|| + ||y||)) 2^-126, and the cosine by that times inv_x inv_y <= 1e24 (norms
// are clamped at 1e-12): far inside the 2^-16 slack. Norms <= 2^60 keep every product of two norms finite; a huge or
// non-finite norm turns the screen off, as does a threshold so low that nothing would be left out. It pays where the
// graph is sparse (image features at the official thresholds: a few percent of the pairs); MRPRUNE_CPU_SCREEN=0 turns
// it off, =1 forces it on for any d (tests; by default d >= 256).
class Screen {
 public:
  ~Screen() { gemm::ReusedBuffers::give(std::move(buffer_)); }
  Screen(const Screen&) = delete;
  Screen& operator=(const Screen&) = delete;

  Screen(const RowMatrix& x, const float* inv, float threshold) {
    const char* env = std::getenv("MRPRUNE_CPU_SCREEN");
    const std::string setting = env != nullptr ? env : "";
    if (x.elem != dots::Elem::kFloat32 || x.rows == 0 || setting == "0") return;
    if (!gemm::mode_for(dots::Elem::kBFloat16, 32).amx || !dots::isa().avx512_bf16) return;
    if (x.d < 256 && setting != "1") return;
    margin_ = 0x1.0p-8f + 0x1.0p-18f + 2.f * static_cast<float>(x.d + 1) * 0x1.0p-24f + 0x1.0p-16f;
    cut_ = threshold - margin_;
    if (!(cut_ > -1.f)) return;
    // norm <= 2^60 (inv >= 2^-60; NaN fails too)
    if (!std::all_of(inv, inv + x.rows, [](float v) { return v >= 0x1.0p-60f; })) return;
    const int64_t dp = (x.d + 31) / 32 * 32;
    buffer_ = gemm::ReusedBuffers::take(static_cast<size_t>(x.rows * dp / 2));
    uint16_t* rounded = reinterpret_cast<uint16_t*>(buffer_.data.get());
#ifdef MRPRUNE_X86_AVX512
    torch::stable::parallel_for(0, x.rows, 64, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        gemm::round_row_bf16(static_cast<const float*>(x.row(i)), x.d, dp, rounded + i * dp);
      }
    });
    rows_ = RowMatrix{rounded, dots::Elem::kBFloat16, x.rows, dp, dp};
    active_ = true;
#endif
  }

  // Whether tiles are screened (else callers compute every pair).
  bool active() const { return active_; }
  // Pairs whose screened cosine lies below cut() have an exact cosine below the threshold.
  float cut() const { return cut_; }
  // The rows rounded to bfloat16, zero-padded to a multiple of 32 columns.
  const RowMatrix& rows() const { return rows_; }

 private:
  bool active_ = false;
  float margin_ = 0.f, cut_ = 0.f;
  RowMatrix rows_{nullptr, dots::Elem::kBFloat16, 0, 0, 0};
  gemm::ReusedBuffers::Buffer buffer_;
};

// Blocks of a screened visit, one object per thread: compute() takes the block of the rounded rows, marks the pairs
// whose screened cosine reaches the cut (on the diagonal of an upper visit, j >= i only) and computes those exactly.
class ScreenedDots {
 public:
  explicit ScreenedDots(dots::Elem elem) : exact_(elem), need_(TileDots::kMaxRows * TileDots::ld()) {}

  // Raw products of rows i0.. of a by rows j0.. of b (row stride TileDots::ld()) where need() is set; nullptr when
  // no pair of the block can reach the cut. `packed`: rounded_b packed ahead.
  const float* compute(const RowMatrix& a, const Screen& screen_a, const float* inv_a, int64_t i0, int64_t m,
                       const RowMatrix& b, const Screen& screen_b, const float* inv_b, int64_t j0, int64_t n,
                       const gemm::PackedPanels* packed, bool upper) {
    const int64_t ld = TileDots::ld();
    const float* approx = screened_.compute(screen_a.rows(), i0, m, screen_b.rows(), j0, n, packed);
    bool any = false;
    for (int64_t r = 0; r < m; ++r) {
      const int64_t i = i0 + r, c0 = upper ? std::max<int64_t>(0, i - j0) : 0;
      uint8_t* flags = need_.data() + r * ld;
      std::fill(flags, flags + n, uint8_t{0});
      for_each_at_least(approx + r * ld + c0, inv_b + j0 + c0, inv_a[i], n - c0, screen_a.cut(),
                        [&](int64_t c, float) { flags[c0 + c] = 1, any = true; });
    }
    return any ? exact_.compute_masked(a, i0, m, b, j0, n, need_.data()) : nullptr;
  }

  // need()[r * TileDots::ld() + c]: whether the last compute() computed pair (r, c).
  const uint8_t* need() const { return need_.data(); }

 private:
  TileDots screened_{dots::Elem::kBFloat16}, exact_;
  std::vector<uint8_t> need_;
};

// Calls fn(i0, m, j0, n, raw, ld) for every block of the upper triangle of x x^T (rows i0..i0+m, columns
// j0..j0+n with j0 >= i0; raw[r * ld + c] = x_{i0+r} . x_{j0+c}, raw dot products), in parallel. Every unordered
// pair {i, j} lies in exactly one block as (min, max); a block starting on the diagonal also holds pairs with j < i,
// whose raw entries are undefined (the callback must skip them). fn runs concurrently for different blocks, in no
// fixed order; `slot` (0 <= slot < items()) identifies the calling chunk for per-chunk scratch.
class UpperTiles {
 public:
  explicit UpperTiles(const RowMatrix& x) : x_(x), n_(x.rows), tile_rows_(tile_rows(x)) {
    // Every upper block, row tiles taken in folded order (w, R-1-w, ...) so that consecutive blocks of a static
    // chunk mix long and short rows of the triangle: the threads get about the same number of multiply-adds.
    const int64_t row_tiles = (n_ + tile_rows_ - 1) / tile_rows_;
    for (int64_t w = 0; w < (row_tiles + 1) / 2; ++w) {
      add_row_tile(w);
      if (row_tiles - 1 - w != w) add_row_tile(row_tiles - 1 - w);
    }
  }

  // Number of work items (blocks); slots lie in [0, items()).
  int64_t items() const { return static_cast<int64_t>(blocks_.size()); }
  // Rows per row tile: blocks start at rows i0 = multiples of it and columns j0 = multiples of kTileCols.
  int64_t rows_per_tile() const { return tile_rows_; }

  // visit() for a threshold rule with an active Screen of x (inv: x's inverse norms): fn(i0, m, j0, n, raw, ld,
  // need, slot) gets the exact raw products only where need[r * ld + c] is set; every other pair of the upper
  // triangle has a cosine below the screen's threshold. Blocks without such pairs are skipped.
  template <class F>
  void visit_screened(const Screen& screen, const float* inv, const F& fn,
                      const std::atomic<bool>* stop = nullptr) const {
    const RowMatrix& x = x_;
    const auto packed = pack_panels(screen.rows());
    // Blocks cost what their candidates cost: each thread takes the next block as it gets free.
    std::atomic<int64_t> next{0};
    torch::stable::parallel_for(0, items(), 1, [&](int64_t begin, int64_t) {
      ScreenedDots dots(x.elem);
      for (int64_t w = next++; w < items(); w = next++) {
        if (stop != nullptr && stop->load(std::memory_order_relaxed)) return;
        const auto [i0, m, j0, n] = block(w);
        const float* raw = dots.compute(x, screen, inv, i0, m, x, screen, inv, j0, n, packed.get(), true);
        if (raw != nullptr) fn(i0, m, j0, n, raw, TileDots::ld(), dots.need(), begin);
      }
    });
  }

  // `stop` (optional) ends the visit early once set by a callback.
  template <class F>
  void visit(const F& fn, const std::atomic<bool>* stop = nullptr) const {
    const RowMatrix& x = x_;
    const auto packed = pack_panels(x);
    torch::stable::parallel_for(0, items(), 1, [&](int64_t begin, int64_t end) {
      TileDots dots(x.elem);
      for (int64_t w = begin; w < end; ++w) {
        if (stop != nullptr && stop->load(std::memory_order_relaxed)) return;
        const auto [i0, m, j0, n] = block(w);
        fn(i0, m, j0, n, dots.compute(x, i0, m, x, j0, n, packed.get(), true), TileDots::ld(), begin);
      }
    });
  }

 private:
  // Block w as (i0, m, j0, n). Rows below the block's last column hold only pairs j < i: not computed.
  std::array<int64_t, 4> block(int64_t w) const {
    const auto [i0, j0] = blocks_[w];
    const int64_t n = std::min(kTileCols, n_ - j0), m = std::min({tile_rows_, n_ - i0, j0 + n - i0});
    return {i0, m, j0, n};
  }

  void add_row_tile(int64_t t) {
    for (int64_t j0 = t * tile_rows_; j0 < n_; j0 += kTileCols) blocks_.emplace_back(t * tile_rows_, j0);
  }

  RowMatrix x_;
  int64_t n_, tile_rows_;
  std::vector<std::pair<int64_t, int64_t>> blocks_;
};

// Calls fn(i0, m, j0, n, raw, ld) for every block of a b^T (rows of a by rows of b), in parallel over blocks (any
// thread, any order: for callbacks that write each block's own outputs). The longer side streams through the kernel
// rows and the shorter one is packed (a_i . b_j == b_j . a_i bitwise, gram_kernels.h): at 576 x 1866 x 4096
// bfloat16 on AVX-512 BF16, packing the 1866 keys was 7 % of the work. Not on AMX, whose whole-k blocks read the
// rows of a in place and so want the unindexed side there (as before; not measured here). Blocks are taken by
// whichever thread is free (a static split left one thread idle for 12 % of the products there: row tiles of unequal
// height).
template <class F>
inline void visit_cross_blocks(const RowMatrix& a, const RowMatrix& b, const F& fn) {
  const bool swap = b.rows > a.rows && !gemm::mode_for(a.elem, a.d).amx;
  const RowMatrix& tall = swap ? b : a;
  const RowMatrix& wide = swap ? a : b;
  const int64_t rows = tile_rows(tall);
  const int64_t row_tiles = (tall.rows + rows - 1) / rows, col_tiles = (wide.rows + kTileCols - 1) / kTileCols;
  const auto packed = pack_panels(wide);
  std::atomic<int64_t> next{0};
  torch::stable::parallel_for(0, row_tiles * col_tiles, 1, [&](int64_t, int64_t) {
    TileDots dots(a.elem);
    std::vector<float> flipped(swap ? kTileCols * TileDots::kMaxRows : 0);
    for (int64_t w = next++; w < row_tiles * col_tiles; w = next++) {
      const int64_t i0 = (w / col_tiles) * rows, j0 = (w % col_tiles) * kTileCols;
      const int64_t m = std::min(rows, tall.rows - i0), n = std::min(kTileCols, wide.rows - j0);
      const float* raw = dots.compute(tall, i0, m, wide, j0, n, packed.get());
      if (!swap) {
        fn(i0, m, j0, n, raw, TileDots::ld());
        continue;
      }
      // The block as rows of a: [n][m], row stride kMaxRows.
      for (int64_t r = 0; r < m; ++r) {
        for (int64_t c = 0; c < n; ++c) flipped[c * TileDots::kMaxRows + r] = raw[r * TileDots::ld() + c];
      }
      fn(j0, n, i0, m, flipped.data(), TileDots::kMaxRows);
    }
  });
}

// visit_cross_blocks for a threshold rule with active Screens of a and b (same threshold; inv_a, inv_b: inverse
// norms): fn(i0, m, j0, n, raw, ld, need) gets the exact raw products only where need[r * ld + c] is set; every other
// pair has a cosine below the threshold. Blocks without such pairs are skipped.
template <class F>
inline void visit_cross_blocks_screened(const RowMatrix& a, const Screen& screen_a, const float* inv_a,
                                        const RowMatrix& b, const Screen& screen_b, const float* inv_b, const F& fn) {
  const int64_t rows = TileDots::kMaxRows;
  const int64_t row_tiles = (a.rows + rows - 1) / rows, col_tiles = (b.rows + kTileCols - 1) / kTileCols;
  const auto packed = pack_panels(screen_b.rows());
  // Blocks cost what their candidates cost: each thread takes the next block as it gets free.
  std::atomic<int64_t> next{0};
  torch::stable::parallel_for(0, row_tiles * col_tiles, 1, [&](int64_t, int64_t) {
    ScreenedDots dots(a.elem);
    for (int64_t w = next++; w < row_tiles * col_tiles; w = next++) {
      const int64_t i0 = (w / col_tiles) * rows, j0 = (w % col_tiles) * kTileCols;
      const int64_t m = std::min(rows, a.rows - i0), n = std::min(kTileCols, b.rows - j0);
      const float* raw = dots.compute(a, screen_a, inv_a, i0, m, b, screen_b, inv_b, j0, n, packed.get(), false);
      if (raw != nullptr) fn(i0, m, j0, n, raw, TileDots::ld(), dots.need());
    }
  });
}

// Calls fn(i0, m, j0, n, raw, ld) for every block of a b^T (rows of a by rows of b), in parallel over row tiles: the
// blocks of one row tile are visited by one thread in ascending column order (a fixed order per row).
template <class F>
inline void visit_cross_tiles(const RowMatrix& a, const RowMatrix& b, const F& fn) {
  const int64_t rows = tile_rows(a), row_tiles = (a.rows + rows - 1) / rows;
  const auto packed = pack_panels(b);
  torch::stable::parallel_for(0, row_tiles, 1, [&](int64_t begin, int64_t end) {
    TileDots dots(a.elem);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t i0 = t * rows, m = std::min(rows, a.rows - i0);
      for (int64_t j0 = 0; j0 < b.rows; j0 += kTileCols) {
        const int64_t n = std::min(kTileCols, b.rows - j0);
        fn(i0, m, j0, n, dots.compute(a, i0, m, b, j0, n, packed.get()), TileDots::ld());
      }
    }
  });
}

// The full cosine Gram S[:n, :n] (row stride lds) of x: upper blocks computed once, mirrored (bitwise symmetric).
inline void cosine_gram(const RowMatrix& x, const float* inv, float* s, int64_t lds) {
  UpperTiles(x).visit([&](int64_t i0, int64_t m, int64_t j0, int64_t cols, const float* raw, int64_t ld, int64_t) {
    for (int64_t r = 0; r < m; ++r) {
      const int64_t i = i0 + r;
      for (int64_t c = std::max<int64_t>(0, i - j0); c < cols; ++c) {
        const int64_t j = j0 + c;
        const float v = raw[r * ld + c] * (inv[i] * inv[j]);
        s[i * lds + j] = v;
        s[j * lds + i] = v;
      }
    }
  });
}

// The raw Gram G = x x^T (no normalisation), bitwise symmetric, into g[:n, :n] (row stride ldg).
inline void raw_gram(const RowMatrix& x, float* g, int64_t ldg) {
  UpperTiles(x).visit([&](int64_t i0, int64_t m, int64_t j0, int64_t cols, const float* raw, int64_t ld, int64_t) {
    for (int64_t r = 0; r < m; ++r) {
      const int64_t i = i0 + r;
      for (int64_t c = std::max<int64_t>(0, i - j0); c < cols; ++c) g[i * ldg + j0 + c] = raw[r * ld + c];
    }
    // The mirror column by column: contiguous runs of the output row instead of a stride-ldg write per entry.
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t j = j0 + c;
      for (int64_t r = 0; r < std::min(m, j - i0 + 1); ++r) g[j * ldg + i0 + r] = raw[r * ld + c];
    }
  });
}

// Extra-memory budget (bytes) of the CPU kernels' optional structures (graph edge lists, a materialised Gram):
// the feature matrix's own size, at least 256 MiB. MRPRUNE_CPU_WORKSPACE_BYTES overrides it (tests use it to force
// the streaming paths on small inputs).
inline int64_t workspace_budget(const RowMatrix& x) {
  if (const char* env = std::getenv("MRPRUNE_CPU_WORKSPACE_BYTES")) return std::atoll(env);
  return std::max<int64_t>(int64_t{256} << 20, x.rows * x.d * dots::elem_size(x.elem));
}

}  // namespace mrprune::cpu
