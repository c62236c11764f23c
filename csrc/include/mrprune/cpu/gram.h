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

// Panels packed once for all the tiles of a visit (in parallel over panels).
inline std::unique_ptr<gemm::PackedPanels> pack_panels(std::unique_ptr<gemm::PackedPanels> packed) {
  torch::stable::parallel_for(0, packed->panels(), 4, [&](int64_t begin, int64_t end) { packed->pack(begin, end); });
  return packed;
}

// b's tile operand packed once for all the tiles of a visit.
inline std::unique_ptr<gemm::PackedPanels> pack_panels(const RowMatrix& b) {
  return pack_panels(std::make_unique<gemm::PackedPanels>(b));
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

// Screening Gram tiles for a threshold rule (cos >= threshold): a cheap approximation x~ of every row gives every
// pair's cosine to within a proven margin, and only the pairs whose screened cosine reaches the cut are computed
// exactly, by the usual kernels (TileDots::compute_masked: the same bits as the full tile), so thresholded results do
// not change by one bit. It pays where the graph is sparse (image features at the official thresholds: a few percent
// of the pairs). Two kinds, by what is cheaper than the exact products on this CPU:
//   * float32 rows on AMX CPUs: a bfloat16 copy, screened on AMX. Rounding to bfloat16 moves each value by at most
//     2^-9 of itself, so ||x - x~|| <= 2^-9 ||x||: eps = 2^-9 per row.
//   * rows whose exact products are float32 FMA (float32 without AMX, float16, bfloat16 without AVX-512 BF16) on
//     CPUs with AVX-512 VNNI: each row quantised to int8 with its own scale s = max|x_k| / 127 (q = round(x / s),
//     |q| <= 127), screened by exact int32 dot products (VPDPBUSD: four times the multiply-adds per instruction of
//     float32 FMA; a float32 2304-token LLaVA-NeXT graph took 60 instead of 103 ms on one Zen 5 core). Not for
//     bfloat16 pairs on VDPBF16PS, only half as fast as the screen: screen plus the exact quarter cost what the
//     exact products alone do (50 against 53 ms there). eps is measured per row: eps_x = ||x - s q|| / ||x|| (the
//     float32 sum of squares, rounded up by 2^-10).
// The bound: |x.y - x~.y~| <= ||x - x~|| ||y|| + ||x~|| ||y - y~||, so in cosine units the screened value is within
// eps_x + (1 + eps_x) eps_y of the exact one; the exact float32 accumulation errs by at most (d + 1) 2^-24 ||x|| ||y||
// (recursive summation in any order), the screen's own float32 rounding and the inverse norms by a few ulps, all
// inside slack = 2 (d + 1) 2^-24 + 2^-16. What bfloat16, AMX and VDPBF16PS flush to zero (denormal values and
// products) changes a dot product by at most (d + sqrt(d) (||x|| + ||y||)) 2^-126: the bfloat16 screen requires
// norms <= 2^60 and the int8 screen entries of magnitude within [2^-50, 2^50] (or rows of zeros), which keeps that
// far inside the slack and every scale product a normal float. A non-finite or out-of-range row, a D above 65,536
// (int32 sums), or a threshold so low that nothing would be left out turns the screen off. MRPRUNE_CPU_SCREEN=0 turns
// it off, =1 forces it on for any d (tests; by default d >= 256).
class Screen {
 public:
  enum class Kind { kNone, kBFloat16, kInt8 };

  ~Screen() {
    gemm::ReusedBuffers::give(std::move(buffer_));
    gemm::ReusedBuffers::give(std::move(quantized_));
  }
  Screen(const Screen&) = delete;
  Screen& operator=(const Screen&) = delete;

  Screen(const RowMatrix& x, const float* inv, float threshold) : threshold_(threshold) {
    const char* env = std::getenv("MRPRUNE_CPU_SCREEN");
    const std::string setting = env != nullptr ? env : "";
    if (x.rows == 0 || x.d == 0 || setting == "0" || (x.d < 256 && setting != "1")) return;
    if (gemm::mode_for(x.elem, x.d).amx) return;  // bfloat16 rows on AMX: the exact products are as cheap
    slack_ = 2.f * static_cast<float>(x.d + 1) * 0x1.0p-24f + 0x1.0p-16f;
#ifdef MRPRUNE_X86_AVX512
    if (x.elem == dots::Elem::kFloat32 && gemm::mode_for(dots::Elem::kBFloat16, 32).amx && dots::isa().avx512_bf16) {
      eps_ = 0x1.0p-9f;
      if (!(cut(*this) > -1.f)) return;
      // norm <= 2^60 (inv >= 2^-60; NaN fails too)
      if (!std::all_of(inv, inv + x.rows, [](float v) { return v >= 0x1.0p-60f; })) return;
      quantize_bf16(x);
      kind_ = Kind::kBFloat16;
    } else if (dots::isa().avx512_vnni && x.d <= 65536 && !gemm::mode_for(x.elem, x.d).pairs) {
      if (quantize_int8(x, inv) && cut(*this) > -1.f) kind_ = Kind::kInt8;
    }
#else
    (void)inv;
#endif
  }

  // Whether tiles are screened (else callers compute every pair), and how.
  bool active() const { return kind_ != Kind::kNone; }
  Kind kind() const { return kind_; }
  // Pairs of this screen's rows with `other`'s (same threshold) whose screened cosine lies below cut(other) have an
  // exact cosine below the threshold.
  float cut(const Screen& other) const { return threshold_ - (eps_ + (1.f + eps_) * other.eps_ + slack_); }
  // The rows as the screen's B operand: kBFloat16: rounded to bfloat16; kInt8: the unsigned bytes q + 128 as 32-bit
  // words (four bytes each); both zero-padded to a multiple of 64 bytes (q = 0 there).
  const RowMatrix& rows() const { return rows_; }
  // kInt8: row i's quantised values q (signed bytes, as 32-bit words: the A operand), its scale and its sum of q.
  const uint32_t* quantized_row(int64_t i) const {
    return reinterpret_cast<const uint32_t*>(quantized_.data.get()) + i * rows_.d;
  }
  const float* scales() const { return scale_.data(); }
  const int32_t* sums() const { return sum_.data(); }

  // The rows packed as the B operand of the screen's tiles.
  std::unique_ptr<gemm::PackedPanels> pack() const {
    return pack_panels(kind_ == Kind::kInt8 ? gemm::PackedPanels::of_words(rows_)
                                            : std::make_unique<gemm::PackedPanels>(rows_));
  }

 private:
#ifdef MRPRUNE_X86_AVX512
  void quantize_bf16(const RowMatrix& x) {
    const int64_t dp = (x.d + 31) / 32 * 32;
    buffer_ = gemm::ReusedBuffers::take(static_cast<size_t>(x.rows * dp / 2));
    uint16_t* rounded = reinterpret_cast<uint16_t*>(buffer_.data.get());
    torch::stable::parallel_for(0, x.rows, 64, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        gemm::round_row_bf16(static_cast<const float*>(x.row(i)), x.d, dp, rounded + i * dp);
      }
    });
    rows_ = RowMatrix{rounded, dots::Elem::kBFloat16, x.rows, dp, dp};
  }

  // false: a row the screen cannot take (see the class comment).
  bool quantize_int8(const RowMatrix& x, const float* inv) {
    const int64_t dp = (x.d + 63) / 64 * 64;
    quantized_ = gemm::ReusedBuffers::take(static_cast<size_t>(x.rows * dp / 4));
    buffer_ = gemm::ReusedBuffers::take(static_cast<size_t>(x.rows * dp / 4));
    int8_t* q = reinterpret_cast<int8_t*>(quantized_.data.get());
    uint8_t* biased = reinterpret_cast<uint8_t*>(buffer_.data.get());
    scale_.resize(x.rows);
    sum_.resize(x.rows);
    std::vector<float> eps(x.rows);
    std::atomic<bool> ok{true};
    torch::stable::parallel_for(0, x.rows, 64, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        float error = 0.f;
        if (!quantize_row_int8(x.row(i), x.elem, x.d, dp, q + i * dp, biased + i * dp, &scale_[i], &sum_[i], &error)) {
          ok = false;
          return;
        }
        eps[i] = std::sqrt(error) * inv[i] * (1.f + 0x1.0p-10f);
      }
    });
    if (!ok) return false;
    eps_ = *std::max_element(eps.begin(), eps.end());
    rows_ = RowMatrix{biased, dots::Elem::kFloat32, x.rows, dp / 4, dp / 4};
    return std::isfinite(eps_);
  }

  // Row x (d values) quantised: q[k] = round(x[k] / s) with s = max|x| / 127 (q = 0 for a row of zeros), biased[k] =
  // q[k] + 128, both zero-padded (q = 0) to dp; *sum = sum of q, *error = sum of (x - s q)^2 in float32. false: an
  // entry of magnitude outside [2^-50, 2^50] leads the row (or NaN/Inf).
  MRPRUNE_AVX512 static bool quantize_row_int8(const void* row, dots::Elem elem, int64_t d, int64_t dp, int8_t* q,
                                               uint8_t* biased, float* scale, int32_t* sum, float* error) {
    const auto mask = [&](int64_t k) {
      return d - k >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (d - k)) - 1);
    };
    __m512 largest = _mm512_setzero_ps();
    for (int64_t k = 0; k < d; k += 16) {
      largest = _mm512_max_ps(largest, _mm512_abs_ps(dots::load16(row, elem, k, mask(k))));
    }
    const float top = _mm512_reduce_max_ps(largest);
    if (!(top <= 0x1.0p50f)) return false;  // Inf (NaN reads as below, caught by the error's finiteness)
    std::fill(q, q + dp, int8_t{0});
    std::fill(biased, biased + dp, uint8_t{128});
    *scale = 0.f, *sum = 0, *error = 0.f;
    if (top == 0.f) return true;
    if (top < 0x1.0p-50f) return false;
    const float s = top / 127.f;
    const __m512 step = _mm512_set1_ps(s), bound = _mm512_set1_ps(127.f);
    __m512 squares = _mm512_setzero_ps();
    __m512i total = _mm512_setzero_si512();
    for (int64_t k = 0; k < d; k += 16) {
      const __m512 v = dots::load16(row, elem, k, mask(k));
      // v / s rounded to nearest, clamped (|v| <= top rounds to at most 127 anyway)
      const __m512 level = _mm512_min_ps(bound, _mm512_max_ps(-bound, _mm512_roundscale_ps(_mm512_div_ps(v, step),
                                                                                         _MM_FROUND_TO_NEAREST_INT)));
      const __m512 residual = _mm512_fnmadd_ps(step, level, v);  // v - s q, rounded once
      squares = _mm512_fmadd_ps(residual, residual, squares);
      const __m512i levels = _mm512_cvtps_epi32(level);
      total = _mm512_add_epi32(total, levels);
      _mm_mask_storeu_epi8(q + k, mask(k), _mm512_cvtsepi32_epi8(levels));
      _mm_mask_storeu_epi8(biased + k, mask(k), _mm512_cvtepi32_epi8(_mm512_add_epi32(levels, _mm512_set1_epi32(128))));
    }
    *scale = s;
    *sum = _mm512_reduce_add_epi32(total);
    *error = _mm512_reduce_add_ps(squares);
    return std::isfinite(*error);
  }
#endif

  float threshold_, eps_ = 0.f, slack_ = 0.f;
  Kind kind_ = Kind::kNone;
  RowMatrix rows_{nullptr, dots::Elem::kBFloat16, 0, 0, 0};
  gemm::ReusedBuffers::Buffer buffer_, quantized_;
  std::vector<float> scale_;
  std::vector<int32_t> sum_;
};

// Approximate raw dot products of two int8 screens' rows: (sum_k q_a (q_b + 128) - 128 sum_k q_a) s_a s_b, the
// integer part exact. One object per thread.
class QuantizedDots {
 public:
  QuantizedDots()
      : ints_(new int32_t[TileDots::kMaxRows * TileDots::ld()]()),
        result_(new float[TileDots::kMaxRows * TileDots::ld()]) {}

  // Rows i0..i0+m of a by rows j0..j0+n of b (b's rows packed in `packed`, j0 a multiple of 32), row stride
  // TileDots::ld(). `upper`: as TileDots::compute (8 x 32 blocks wholly below the diagonal are left undefined).
  const float* compute(const Screen& a, int64_t i0, int64_t m, const Screen& b, int64_t j0, int64_t n,
                       const gemm::PackedPanels& packed, bool upper) {
#ifdef MRPRUNE_X86_AVX512
    // The whole k range per kernel call: a panel is one [words][32] run (words is a multiple of 16).
    const int64_t words = a.rows().d, ld = TileDots::ld(), panels = (n + gemm::kNR - 1) / gemm::kNR;
    for (int64_t r0 = 0; r0 < m; r0 += gemm::kMR) {
      const int rows = static_cast<int>(std::min<int64_t>(gemm::kMR, m - r0));
      const uint32_t* arows[gemm::kMR];
      for (int r = 0; r < rows; ++r) arows[r] = a.quantized_row(i0 + r0 + r);
      for (int64_t p = 0; p < panels; ++p) {
        if (upper && j0 + (p + 1) * gemm::kNR <= i0 + r0) continue;  // every column below every row
        gemm::kernel_u8s8_rows(rows)(arows, packed.chunk(j0 / gemm::kNR + p, 0), words,
                                     ints_.get() + r0 * ld + p * gemm::kNR, ld);
      }
    }
    scale(a, i0, m, b, j0, n);
#else
    (void)a, (void)i0, (void)m, (void)b, (void)j0, (void)n, (void)packed, (void)upper;
#endif
    return result_.get();
  }

 private:
#ifdef MRPRUNE_X86_AVX512
  MRPRUNE_AVX512 void scale(const Screen& a, int64_t i0, int64_t m, const Screen& b, int64_t j0, int64_t n) {
    const int64_t ld = TileDots::ld();
    for (int64_t r = 0; r < m; ++r) {
      const __m512 row_scale = _mm512_set1_ps(a.scales()[i0 + r]);
      const __m512i bias = _mm512_set1_epi32(a.sums()[i0 + r] * 128);
      for (int64_t c = 0; c < n; c += 16) {
        const __mmask16 tail =
            n - c >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (n - c)) - 1);
        const __m512i dots = _mm512_sub_epi32(_mm512_maskz_loadu_epi32(tail, ints_.get() + r * ld + c), bias);
        const __m512 scales = _mm512_mul_ps(row_scale, _mm512_maskz_loadu_ps(tail, b.scales() + j0 + c));
        _mm512_mask_storeu_ps(result_.get() + r * ld + c, tail, _mm512_mul_ps(_mm512_cvtepi32_ps(dots), scales));
      }
    }
  }
#endif

  std::unique_ptr<int32_t[]> ints_;
  std::unique_ptr<float[]> result_;
};

// Blocks of a screened visit, one object per thread: compute() takes the block of the screen's rows, marks the pairs
// whose screened cosine reaches the cut (on the diagonal of an upper visit, j >= i only) and computes those exactly.
class ScreenedDots {
 public:
  explicit ScreenedDots(dots::Elem elem) : exact_(elem), need_(TileDots::kMaxRows * TileDots::ld()) {}

  // Raw products of rows i0.. of a by rows j0.. of b (row stride TileDots::ld()) where need() is set; nullptr when
  // no pair of the block can reach the cut.
  const float* compute(const RowMatrix& a, const Screen& screen_a, const float* inv_a, int64_t i0, int64_t m,
                       const RowMatrix& b, const Screen& screen_b, const float* inv_b, int64_t j0, int64_t n,
                       const gemm::PackedPanels& packed, bool upper) {
    const int64_t ld = TileDots::ld();
    const float* approx =
        screen_a.kind() == Screen::Kind::kInt8
            ? quantized_.compute(screen_a, i0, m, screen_b, j0, n, packed, upper)
            : screened_.compute(screen_a.rows(), i0, m, screen_b.rows(), j0, n, &packed, upper);
    const float cut = screen_a.cut(screen_b);
    bool any = false;
    for (int64_t r = 0; r < m; ++r) {
      const int64_t i = i0 + r, c0 = upper ? std::max<int64_t>(0, i - j0) : 0;
      uint8_t* flags = need_.data() + r * ld;
      std::fill(flags, flags + n, uint8_t{0});
      for_each_at_least(approx + r * ld + c0, inv_b + j0 + c0, inv_a[i], n - c0, cut,
                        [&](int64_t c, float) { flags[c0 + c] = 1, any = true; });
    }
    return any ? exact_.compute_masked(a, i0, m, b, j0, n, need_.data()) : nullptr;
  }

  // need()[r * TileDots::ld() + c]: whether the last compute() computed pair (r, c).
  const uint8_t* need() const { return need_.data(); }

 private:
  TileDots screened_{dots::Elem::kBFloat16}, exact_;
  QuantizedDots quantized_;
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
    const auto packed = screen.pack();
    // Blocks cost what their candidates cost: each thread takes the next block as it gets free.
    std::atomic<int64_t> next{0};
    torch::stable::parallel_for(0, items(), 1, [&](int64_t begin, int64_t) {
      ScreenedDots dots(x.elem);
      for (int64_t w = next++; w < items(); w = next++) {
        if (stop != nullptr && stop->load(std::memory_order_relaxed)) return;
        const auto [i0, m, j0, n] = block(w);
        const float* raw = dots.compute(x, screen, inv, i0, m, x, screen, inv, j0, n, *packed, true);
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
      gemm::transpose_block(raw, TileDots::ld(), m, n, flipped.data(), TileDots::kMaxRows);
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
  const auto packed = screen_b.pack();
  // Blocks cost what their candidates cost: each thread takes the next block as it gets free.
  std::atomic<int64_t> next{0};
  torch::stable::parallel_for(0, row_tiles * col_tiles, 1, [&](int64_t, int64_t) {
    ScreenedDots dots(a.elem);
    for (int64_t w = next++; w < row_tiles * col_tiles; w = next++) {
      const int64_t i0 = (w / col_tiles) * rows, j0 = (w % col_tiles) * kTileCols;
      const int64_t m = std::min(rows, a.rows - i0), n = std::min(kTileCols, b.rows - j0);
      const float* raw = dots.compute(a, screen_a, inv_a, i0, m, b, screen_b, inv_b, j0, n, *packed, false);
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
