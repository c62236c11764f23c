// Blocks of dot products between feature rows (a Gram tile), stored as float32, bfloat16 or float16, with float32
// accumulation, in an order that depends only on the two rows.
//
// Each dot product x_i . x_j is accumulated in ONE float32 register lane, sequentially over runs of 64 k by fused
// multiply-add (float32 and float16 rows; bfloat16 rows on CPUs without AVX-512 BF16) or over runs of 64 pairs of k
// by VDPBF16PS (bfloat16 rows with AVX-512 BF16), the runs' partial sums added in order (blocked summation); or by
// AMX TDPBF16PS (bfloat16 rows where the CPU and OS allow AMX), whose per-element order is the instruction's. Which
// block, tile position, thread or kernel edge case computes the pair never changes its rounding, so
//   * identical tokens get bit-identical similarities (exact ties stay exact; issue 14),
//   * x_i . x_j == x_j . x_i bitwise (every product is commutative and the order is the same): a Gram built from
//     these tiles is exactly symmetric,
//   * a row recomputed later (streaming selections) equals the one computed inside a tile.
//
// Half precision is never upcast as a whole: a product of two bfloat16 (8-bit significand) or two float16 (11-bit)
// numbers is exact in float32 (24 bits), so the float32-accumulated dot product of raw half rows equals the float32
// computation on upcast rows up to summation order. float16 rows (and bfloat16 rows without AVX-512 BF16) are
// converted one k-chunk of one tile at a time and give bit-identical results to upcast float32 rows; with VDPBF16PS
// the two products of a pair are summed in the instruction's order and denormal inputs read as 0.
//
// Layout (a BLIS-style outer-product kernel): an 8-row by 32-column accumulator block; the 8 "A" values per k are
// broadcast straight from the rows (or from a float32 copy of the k-chunk for converted types); the "B" rows are
// packed k-major ([k][32] floats, or [pair][32] bfloat16 pairs) by 16 x 16 register transposes (bfloat16
// pairs: once per call for all tiles, PackedPanels).
//
// Torch-free C++17: the AVX-512 code is compiled by target attributes and chosen at run time
// (dots::isa()); other CPUs use portable loops with the same per-pair order as the float32 path.
#pragma once

#include <algorithm>
#include <memory>
#include <mutex>
#include <vector>

#include "mrprune/cpu/dot_kernels.h"

namespace mrprune::cpu::gemm {

using dots::Elem;

// A row-major [rows, d] matrix of features in their stored type (row stride in elements).
struct RowMatrix {
  const void* data;
  Elem elem;
  int64_t rows;
  int64_t d;
  int64_t stride;
  const int64_t* index = nullptr;  // optional: row i is stored row index[i] (a gather without copying)

  const void* row(int64_t i) const {
    return static_cast<const char*>(data) + (index != nullptr ? index[i] : i) * stride * dots::elem_size(elem);
  }
};

constexpr int kMR = 8;        // accumulator rows
constexpr int kNR = 32;       // accumulator columns (two zmm)
constexpr int64_t kKC = 256;  // k per chunk (elements, or bfloat16 pairs)
constexpr int64_t kSub = 64;  // k per register partial sum (blocked summation)

// k rounded up to whole 16-word steps (packed panels and AMX tiles are padded with zeros to it).
constexpr int64_t padded(int64_t k) { return (k + 15) / 16 * 16; }

#ifdef MRPRUNE_X86_AVX512

// C = partial, or C = C + partial.
template <int R>
MRPRUNE_AVX512 inline void store_partial(const __m512 (&acc)[R][2], float* c, int64_t ldc, bool add) {
  for (int r = 0; r < R; ++r) {
    for (int h = 0; h < 2; ++h) {
      float* dst = c + r * ldc + h * 16;
      _mm512_storeu_ps(dst, add ? _mm512_add_ps(_mm512_loadu_ps(dst), acc[r][h]) : acc[r][h]);
    }
  }
}

// In-register transpose of a 16 x 16 block of 32-bit values: out[k][r] = in[r][k].
MRPRUNE_AVX512 inline void transpose16(__m512 r[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int g = 0; g < 4; ++g) {  // rows 4g .. 4g+3
    u[4 * g + 0] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0x44);
    u[4 * g + 1] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0xEE);
    u[4 * g + 2] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0x44);
    u[4 * g + 3] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0xEE);
  }
  // u[4g + m] holds, in 128-bit lane L, rows 4g..4g+3 at k = 4L + m.
  for (int m = 0; m < 4; ++m) {
    const __m512 v0 = _mm512_shuffle_f32x4(u[m], u[4 + m], 0x88);
    const __m512 v1 = _mm512_shuffle_f32x4(u[m], u[4 + m], 0xDD);
    const __m512 v2 = _mm512_shuffle_f32x4(u[8 + m], u[12 + m], 0x88);
    const __m512 v3 = _mm512_shuffle_f32x4(u[8 + m], u[12 + m], 0xDD);
    r[m] = _mm512_shuffle_f32x4(v0, v2, 0x88);
    r[8 + m] = _mm512_shuffle_f32x4(v0, v2, 0xDD);
    r[4 + m] = _mm512_shuffle_f32x4(v1, v3, 0x88);
    r[12 + m] = _mm512_shuffle_f32x4(v1, v3, 0xDD);
  }
}

// dst[c * ldd + r] = src[r * lds + c] for r < rows, c < cols (a result block turned into rows of the other
// operand): 16 x 16 register transposes instead of a scalar loop whose stores land a whole dst row apart.
MRPRUNE_AVX512 inline void transpose_block_avx512(const float* src, int64_t lds, int64_t rows, int64_t cols,
                                                  float* dst, int64_t ldd) {
  const auto mask = [](int64_t left) {
    return left >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << left) - 1);
  };
  for (int64_t r0 = 0; r0 < rows; r0 += 16) {
    const __mmask16 row_mask = mask(rows - r0);
    for (int64_t c0 = 0; c0 < cols; c0 += 16) {
      const __mmask16 col_mask = mask(cols - c0);
      __m512 t[16];
      for (int i = 0; i < 16; ++i) {
        t[i] = r0 + i < rows ? _mm512_maskz_loadu_ps(col_mask, src + (r0 + i) * lds + c0) : _mm512_setzero_ps();
      }
      transpose16(t);
      for (int64_t k = 0; k < std::min<int64_t>(16, cols - c0); ++k) {
        _mm512_mask_storeu_ps(dst + (c0 + k) * ldd + r0, row_mask, t[k]);
      }
    }
  }
}

// 16 consecutive 32-bit words (float32 values, or bfloat16 pairs) of a row from word k, zero past `words`.
MRPRUNE_AVX512 inline __m512 load_words(const void* row, int64_t k, int64_t words) {
  const int64_t left = words - k;
  const __mmask16 mask = left >= 16 ? static_cast<__mmask16>(0xffff)
                         : left <= 0 ? static_cast<__mmask16>(0)
                                     : static_cast<__mmask16>((1u << left) - 1);
  return _mm512_maskz_loadu_ps(mask, static_cast<const float*>(row) + k);
}

// Pack B: rows [0, nb) of `rows` (pointers), k-chunk [k0, k0 + kc) of 32-bit words (float32 values or bfloat16
// pairs; `words` per row), into panels of 32 columns: out[(p * kcp + k) * 32 + c] = row[32 p + c][k0 + k] with
// kcp = padded(kc); missing rows and k (up to kcp) are 0. Element types that the kernel does not take natively are
// converted here (float16/bfloat16 to float32): then `words` counts elements.
MRPRUNE_AVX512 inline void pack_b_avx512(const void* const* rows, int64_t nb, Elem elem, bool convert, int64_t k0,
                                         int64_t kc, int64_t words, float* out) {
  const int64_t kcp = padded(kc);
  const int64_t panels = (nb + kNR - 1) / kNR;
  for (int64_t p = 0; p < panels; ++p) {
    for (int64_t half = 0; half < 2; ++half) {
      for (int64_t kb = 0; kb < kcp; kb += 16) {
        __m512 r[16];
        for (int i = 0; i < 16; ++i) {
          const int64_t c = p * kNR + half * 16 + i;
          if (c >= nb) {
            r[i] = _mm512_setzero_ps();
          } else if (!convert) {
            r[i] = load_words(rows[c], k0 + kb, std::min(words, k0 + kc));
          } else {
            const int64_t left = std::min(words, k0 + kc) - (k0 + kb);
            const __mmask16 mask = left >= 16 ? static_cast<__mmask16>(0xffff)
                                   : left <= 0 ? static_cast<__mmask16>(0)
                                               : static_cast<__mmask16>((1u << left) - 1);
            r[i] = dots::load16(rows[c], elem, k0 + kb, mask);
          }
        }
        transpose16(r);
        for (int64_t k = 0; k < 16; ++k) _mm512_storeu_ps(out + (p * kcp + kb + k) * kNR + half * 16, r[k]);
      }
    }
  }
}

// A float32 row rounded to bfloat16 (nearest even), d values zero-padded to dp (a multiple of 16).
MRPRUNE_AVX512_BF16 inline void round_row_bf16(const float* x, int64_t d, int64_t dp, uint16_t* out) {
  for (int64_t k = 0; k < dp; k += 16) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + k), (__m256i)_mm512_cvtneps_pbh(load_words(x, k, d)));
  }
}

// C[R x 32] (+)= A[R rows, kc] B[kc x 32]; A rows are float32 at a[r] (already offset to the chunk). Each run of
// kSub k's is summed in registers from 0 and then added to C (blocked summation: the rounding error grows with
// kSub + d / kSub rather than with d).
template <int R>
MRPRUNE_AVX512 void kernel_f32(const float* const* a, const float* b, int64_t kc, float* c, int64_t ldc,
                               bool accumulate) {
  for (int64_t s0 = 0; s0 < kc; s0 += kSub) {
    const int64_t s1 = std::min(kc, s0 + kSub);
    __m512 acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int64_t k = s0; k < s1; ++k) {
      const __m512 b0 = _mm512_loadu_ps(b + k * kNR), b1 = _mm512_loadu_ps(b + k * kNR + 16);
      for (int r = 0; r < R; ++r) {
        const __m512 av = _mm512_set1_ps(a[r][k]);
        acc[r][0] = _mm512_fmadd_ps(av, b0, acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(av, b1, acc[r][1]);
      }
    }
    store_partial<R>(acc, c, ldc, accumulate || s0 > 0);
  }
}

// The same with bfloat16 pairs: a[r] points at the chunk's first pair (uint32), b holds [kc pairs][32] pairs.
template <int R>
MRPRUNE_AVX512_BF16 void kernel_bf16dp(const uint32_t* const* a, const float* b, int64_t kc, float* c, int64_t ldc,
                                       bool accumulate) {
  for (int64_t s0 = 0; s0 < kc; s0 += kSub) {
    const int64_t s1 = std::min(kc, s0 + kSub);
    __m512 acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int64_t k = s0; k < s1; ++k) {
      const __m512bh b0 = (__m512bh)_mm512_loadu_ps(b + k * kNR);
      const __m512bh b1 = (__m512bh)_mm512_loadu_ps(b + k * kNR + 16);
      for (int r = 0; r < R; ++r) {
        const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[r][k]));
        acc[r][0] = _mm512_dpbf16_ps(acc[r][0], av, b0);
        acc[r][1] = _mm512_dpbf16_ps(acc[r][1], av, b1);
      }
    }
    store_partial<R>(acc, c, ldc, accumulate || s0 > 0);
  }
}

using KernelF32 = void (*)(const float* const*, const float*, int64_t, float*, int64_t, bool);
using KernelBF16 = void (*)(const uint32_t* const*, const float*, int64_t, float*, int64_t, bool);

inline KernelF32 kernel_f32_rows(int r) {
  static const KernelF32 table[kMR] = {&kernel_f32<1>, &kernel_f32<2>, &kernel_f32<3>, &kernel_f32<4>,
                                       &kernel_f32<5>, &kernel_f32<6>, &kernel_f32<7>, &kernel_f32<8>};
  return table[r - 1];
}

inline KernelBF16 kernel_bf16_rows(int r) {
  static const KernelBF16 table[kMR] = {&kernel_bf16dp<1>, &kernel_bf16dp<2>, &kernel_bf16dp<3>, &kernel_bf16dp<4>,
                                        &kernel_bf16dp<5>, &kernel_bf16dp<6>, &kernel_bf16dp<7>, &kernel_bf16dp<8>};
  return table[r - 1];
}

// C[R x 32] = A B in int32 for int8 quads (the screen of gram.h): a[r] points at row r's first quad as signed bytes,
// b holds [kc quads][32] unsigned quads. Integer sums are exact: the whole k range in one call, no blocking. The
// broadcast operand is the signed one, which VPDPBUSD reads straight from memory ({1to16}). Written so that GCC
// keeps the accumulators in registers (row pointers copied, loops unrolled, C stored, never reloaded: 97 % of the
// instruction's peak in L1; an accumulating variant copied every accumulator through another register, 70 %).
template <int R>
MRPRUNE_AVX512_VNNI void kernel_u8s8(const uint32_t* const* a, const float* b, int64_t kc, int32_t* c, int64_t ldc) {
  __m512i acc[R][2];
  const uint32_t* rows[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_si512(), rows[r] = a[r];
  for (int64_t k = 0; k < kc; ++k) {
    const __m512i b0 = _mm512_loadu_si512(b + k * kNR), b1 = _mm512_loadu_si512(b + k * kNR + 16);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512i av = _mm512_set1_epi32(static_cast<int>(rows[r][k]));
      acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], b0, av);
      acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], b1, av);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_si512(c + r * ldc, acc[r][0]);
    _mm512_storeu_si512(c + r * ldc + 16, acc[r][1]);
  }
}

using KernelU8S8 = void (*)(const uint32_t* const*, const float*, int64_t, int32_t*, int64_t);

inline KernelU8S8 kernel_u8s8_rows(int r) {
  static const KernelU8S8 table[kMR] = {&kernel_u8s8<1>, &kernel_u8s8<2>, &kernel_u8s8<3>, &kernel_u8s8<4>,
                                        &kernel_u8s8<5>, &kernel_u8s8<6>, &kernel_u8s8<7>, &kernel_u8s8<8>};
  return table[r - 1];
}


// AMX (TDPBF16PS) for bfloat16 pairs: a 32 x 32 block from four 16 x 16 float32 accumulator tiles over `steps` k
// steps of 16 pairs. a: A tiles of 16 rows x 16 pairs, the one of rows 0-15 for step s at a + s * a_step (words), rows
// 16-31 a_half words further, rows a_stride bytes apart; b: one packed 32-column panel ([16 steps][32] pairs), c:
// result block (row stride ldc floats). C is stored and reloaded exactly between calls, so splitting k into calls
// does not change the per-element order. The tile configuration (every tile 16 rows x 64 bytes) is loaded by the
// caller.
#define MRPRUNE_AMX __attribute__((target("amx-tile,amx-bf16,avx512f")))

MRPRUNE_AMX inline void kernel_amx(const uint32_t* a, int64_t a_step, int64_t a_half, int64_t a_stride,
                                   const float* b, int64_t steps, float* c, int64_t ldc, bool accumulate) {
  const int64_t cstride = ldc * 4;
  if (accumulate) {
    _tile_loadd(0, c, cstride);
    _tile_loadd(1, c + 16, cstride);
    _tile_loadd(2, c + 16 * ldc, cstride);
    _tile_loadd(3, c + 16 * ldc + 16, cstride);
  } else {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t s = 0; s < steps; ++s) {
    _tile_loadd(4, a + s * a_step, a_stride);
    _tile_loadd(6, b + s * 16 * kNR, kNR * 4);
    _tile_loadd(7, b + s * 16 * kNR + 16, kNR * 4);
    _tile_dpbf16ps(0, 4, 6);
    _tile_loadd(5, a + s * a_step + a_half, a_stride);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, c, cstride);
  _tile_stored(1, c + 16, cstride);
  _tile_stored(2, c + 16 * ldc, cstride);
  _tile_stored(3, c + 16 * ldc + 16, cstride);
}

struct alignas(64) AmxConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

MRPRUNE_AMX inline void amx_begin() {
  static const AmxConfig config = [] {
    AmxConfig cfg;
    for (int t = 0; t < 8; ++t) cfg.colsb[t] = 64, cfg.rows[t] = 16;
    return cfg;
  }();
  _tile_loadconfig(&config);
}

MRPRUNE_AMX inline void amx_end() { _tile_release(); }

#endif  // MRPRUNE_X86_AVX512

// dst[c * ldd + r] = src[r * lds + c] for r < rows, c < cols.
inline void transpose_block(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst, int64_t ldd) {
#ifdef MRPRUNE_X86_AVX512
  if (dots::isa().avx512) {
    transpose_block_avx512(src, lds, rows, cols, dst, ldd);
    return;
  }
#endif
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) dst[c * ldd + r] = src[r * lds + c];
  }
}

// How tiles of element type `elem` and width d are computed on this CPU: bfloat16 pairs go straight into AMX
// TDPBF16PS or VDPBF16PS (an even d), everything else is float32 (half types converted chunk by chunk).
struct Mode {
  bool avx512 = false, pairs = false, amx = false, convert = false;
  int64_t words = 0;  // 32-bit words per row as the kernels read it: d floats, or d / 2 bfloat16 pairs
};

inline Mode mode_for(Elem elem, int64_t d) {
  Mode mode;
#ifdef MRPRUNE_X86_AVX512
  mode.avx512 = dots::isa().avx512;
#endif
  const bool bf16_pairs = mode.avx512 && elem == Elem::kBFloat16 && d % 2 == 0;
  mode.amx = bf16_pairs && dots::isa().amx_bf16;
  mode.pairs = bf16_pairs && dots::isa().avx512_bf16;
  mode.convert = elem != Elem::kFloat32 && !mode.pairs && !mode.amx;
  mode.words = (mode.pairs || mode.amx) ? d / 2 : d;
  return mode;
}

// Storage for operands packed or rounded per call, reused across calls: glibc maps buffers this large fresh on every
// call (and unmaps them after), and faulting them in 4 KiB pages made up a third of a bfloat16 G-Prune call at the
// LLaVA-NeXT shape (29.8 / 25.9 / 30.9 ms with reuse against 41.8 / 42.7 / 43.2 ms without, interleaved runs).
// Up to kKept released buffers of at most kMaxBytes each stay allocated for the next call (thread-safe): at most
// 96 MiB held between calls.
class ReusedBuffers {
 public:
  static constexpr int kKept = 3;
  static constexpr size_t kMaxBytes = size_t{32} << 20;

  struct Buffer {
    std::unique_ptr<float[]> data;
    size_t floats = 0;
  };

  // A buffer of at least `floats` floats (uninitialised).
  static Buffer take(size_t floats) {
    {
      std::lock_guard<std::mutex> lock(mutex());
      for (Buffer& kept : kept_buffers()) {
        if (kept.data != nullptr && kept.floats >= floats) return std::move(kept);
      }
    }
    return Buffer{std::unique_ptr<float[]>(new float[floats]), floats};
  }

  // Gives a buffer back: kept in place of an empty or smaller slot if it is small enough, else freed.
  static void give(Buffer buffer) {
    if (buffer.data == nullptr || buffer.floats * sizeof(float) > kMaxBytes) return;
    std::lock_guard<std::mutex> lock(mutex());
    Buffer* smallest = nullptr;
    for (Buffer& kept : kept_buffers()) {
      // an empty slot, else the smallest
      if (smallest == nullptr || kept.data == nullptr ||
          (smallest->data != nullptr && kept.floats < smallest->floats)) {
        smallest = &kept;
      }
    }
    if (smallest->data == nullptr || smallest->floats < buffer.floats) std::swap(*smallest, buffer);
  }

 private:
  static std::mutex& mutex() {
    static std::mutex m;
    return m;
  }
  static Buffer (&kept_buffers())[kKept] {
    static Buffer kept[kKept];
    return kept;
  }
};

// The B operand of every tile against the rows of b, packed once, for bfloat16 pairs (AMX and VDPBF16PS; other
// paths leave it empty and tiles pack their own columns): 32-row panels, each a run of k-chunks laid out as the
// per-tile packing lays them out ([padded(kc)][32] pairs), so the kernels read the same values in the same order
// either way. Packed per tile pair, the transposes are repeated for every row tile and take more than half as long
// as the AMX products at N = 2304 (perf); for float32 they are a small share of the FMA work, and a packed float32
// copy (4 N D bytes, faulted in fresh per call) measured slower than packing per tile. Extra memory: 2 N D bytes.
class PackedPanels {
 public:
  explicit PackedPanels(const RowMatrix& b) : PackedPanels(b, mode_for(b.elem, b.d)) {}

  // The rows of `words` (read as 32-bit words whatever its element type: the int8 quads of gram.h's screen), packed
  // as above.
  static std::unique_ptr<PackedPanels> of_words(const RowMatrix& words) {
    Mode raw;
    raw.pairs = true, raw.words = words.d;
    return std::unique_ptr<PackedPanels>(new PackedPanels(words, raw));
  }
  ~PackedPanels() { ReusedBuffers::give(std::move(buffer_)); }
  PackedPanels(const PackedPanels&) = delete;
  PackedPanels& operator=(const PackedPanels&) = delete;

  // Number of 32-row panels to pack (0 when nothing is packed ahead).
  int64_t panels() const { return panels_; }

  // Packs panels [p0, p1) (independent ranges may run on different threads).
  void pack(int64_t p0, int64_t p1) {
#ifdef MRPRUNE_X86_AVX512
    const void* rows[kNR];
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t nb = std::min<int64_t>(kNR, b_.rows - p * kNR);
      for (int64_t c = 0; c < nb; ++c) rows[c] = b_.row(p * kNR + c);
      for (int64_t k0 = 0; k0 < mode_.words; k0 += kKC) {
        pack_b_avx512(rows, nb, b_.elem, mode_.convert, k0, std::min(kKC, mode_.words - k0), mode_.words,
                      buffer_.data.get() + p * stride_ + (k0 / kKC) * padded(kKC) * kNR);
      }
    }
#else
    (void)p0, (void)p1;
#endif
  }

  // Whether tiles of columns of `b` can read their B operand from here.
  bool serves(const RowMatrix& b) const {
    return buffer_.data != nullptr && b.data == b_.data && b.stride == b_.stride && b.index == b_.index;
  }

  // k-chunk k0 (a multiple of kKC) of panel p. Full chunks have no padding (kKC is a multiple of 16), so with words a
  // multiple of 16 chunk(p, 0) is the whole panel as one [words][32] run (the whole-k AMX blocks read it so).
  const float* chunk(int64_t p, int64_t k0) const {
    return buffer_.data.get() + p * stride_ + (k0 / kKC) * padded(kKC) * kNR;
  }

 private:
  PackedPanels(const RowMatrix& b, Mode mode) : b_(b), mode_(mode) {
    if (!(mode_.pairs || mode_.amx) || b.rows == 0 || b.d == 0) return;
    panels_ = (b.rows + kNR - 1) / kNR;
    stride_ = ((mode_.words / kKC) * padded(kKC) + padded(mode_.words % kKC)) * kNR;
    buffer_ = ReusedBuffers::take(static_cast<size_t>(panels_ * stride_));
  }

  RowMatrix b_;
  Mode mode_;
  int64_t panels_ = 0, stride_ = 0;
  ReusedBuffers::Buffer buffer_;
};

// Computes blocks of raw dot products C[i, j] = a_i . b_j (at most kMaxRows x kMaxCols per call). One object per
// thread: it owns the packing and conversion buffers and the result block.
class TileDots {
 public:
  static constexpr int64_t kMaxRows = 256;
  static constexpr int64_t kMaxCols = 128;

  explicit TileDots(Elem elem) : elem_(elem) {
#ifdef MRPRUNE_X86_AVX512
    avx512_ = dots::isa().avx512;
#endif
    packed_.reset(new float[kMaxCols * padded(kKC)]);
    result_.reset(new float[kMaxRows * kMaxCols]);
    if (!avx512_) portable_a_.reset(new float[kMaxRows * kKC]);
    // float32 copies of converted rows, or zero-padded pair blocks for AMX (which of the two is decided per call)
    converted_.reset(new float[kMaxRows * kKC]);
    compact_.reset(new float[kMaxRows * kNR]);
  }

  // Result row stride of compute().
  static constexpr int64_t ld() { return kMaxCols; }

  // C[r, c] = a.row(i0 + r) . b.row(j0 + c) for r < m <= kMaxRows, c < n <= kMaxCols; returns C (row stride ld()).
  // `packed` (optional): b packed ahead (then j0 must be a multiple of 32); the results are the same bits.
  // `upper`: a and b index the same rows and only pairs j0 + c >= i0 + r are wanted; the AVX-512 kernels then skip
  // the 8 x 32 blocks that lie wholly below the diagonal, whose entries are left undefined (a diagonal 128 x 128
  // tile needs 40 of its 64).
  const float* compute(const RowMatrix& a, int64_t i0, int64_t m, const RowMatrix& b, int64_t j0, int64_t n,
                       const PackedPanels* packed = nullptr, bool upper = false) {
    const int64_t d = a.d;
    if (m == 0 || n == 0) return result_.get();
    if (d == 0) {
      for (int64_t r = 0; r < m; ++r) std::fill(result_.get() + r * ld(), result_.get() + r * ld() + n, 0.f);
      return result_.get();
    }
#ifdef MRPRUNE_X86_AVX512
    if (avx512_) {
      compute_avx512(a, i0, m, b, j0, n, packed != nullptr && packed->serves(b) && j0 % kNR == 0 ? packed : nullptr,
                     upper);
      return result_.get();
    }
#endif
    compute_portable(a, i0, m, b, j0, n);
    return result_.get();
  }

  // The entries (r, c) of compute() with need[r * kMaxCols + c] != 0, bit for bit; the others are left undefined.
  // float32 and converted rows on AVX-512 only multiply the rows that need a 32-column panel (in groups of up to 8:
  // the kernels' lanes are independent, so which rows share a group changes no bit) and pack only the panels that are
  // needed; bfloat16 pairs (never screened: gram.h) and the portable loops compute the whole block.
  const float* compute_masked(const RowMatrix& a, int64_t i0, int64_t m, const RowMatrix& b, int64_t j0, int64_t n,
                              const uint8_t* need) {
#ifdef MRPRUNE_X86_AVX512
    const Mode mode = mode_for(elem_, a.d);
    if (avx512_ && a.d > 0 && m > 0 && n > 0 && !mode.pairs && !mode.amx) {
      masked_rows(a, i0, m, b, j0, n, need, mode.convert);
      return result_.get();
    }
#endif
    (void)need;
    return compute(a, i0, m, b, j0, n);
  }

 private:
  // The same blocking and per-pair order as the AVX-512 float32 path (one accumulator per pair and kSub run, k
  // ascending, fused multiply-add, runs added in order), in plain loops the compiler vectorises: bit-identical results
  // on every CPU.
  void compute_portable(const RowMatrix& a, int64_t i0, int64_t m, const RowMatrix& b, int64_t j0, int64_t n) {
    const int64_t d = a.d, panels = (n + kNR - 1) / kNR;
    float* abuf = portable_a_.get();
    float* bbuf = packed_.get();
    for (int64_t k0 = 0; k0 < d; k0 += kKC) {
      const int64_t kc = std::min(kKC, d - k0);
      for (int64_t c = 0; c < panels * kNR; ++c) {
        for (int64_t k = 0; k < kc; ++k) {
          bbuf[((c / kNR) * kc + k) * kNR + c % kNR] = c < n ? dots::load(b.row(j0 + c), elem_, k0 + k) : 0.f;
        }
      }
      for (int64_t r = 0; r < m; ++r) {
        for (int64_t k = 0; k < kc; ++k) abuf[r * kKC + k] = dots::load(a.row(i0 + r), elem_, k0 + k);
      }
      for (int64_t r = 0; r < m; ++r) {
        for (int64_t p = 0; p < panels; ++p) {
          float* c = result_.get() + r * ld() + p * kNR;
          const float* bp = bbuf + p * kc * kNR;
          for (int64_t s0 = 0; s0 < kc; s0 += kSub) {
            float acc[kNR] = {};
            for (int64_t k = s0; k < std::min(kc, s0 + kSub); ++k) {
              const float av = abuf[r * kKC + k];
              for (int j = 0; j < kNR; ++j) acc[j] = std::fma(av, bp[k * kNR + j], acc[j]);
            }
            const bool add = k0 > 0 || s0 > 0;
            for (int j = 0; j < kNR; ++j) c[j] = add ? c[j] + acc[j] : acc[j];
          }
        }
      }
    }
  }

#ifdef MRPRUNE_X86_AVX512
  void compute_avx512(const RowMatrix& a, int64_t i0, int64_t m, const RowMatrix& b, int64_t j0, int64_t n,
                      const PackedPanels* packed, bool upper = false) {
    const Mode mode = mode_for(elem_, a.d);
    const bool amx = mode.amx, pairs = mode.pairs, convert = mode.convert;
    const int64_t words = mode.words;  // 32-bit words per row
    const void* brows[kMaxCols];
    for (int64_t c = 0; c < n; ++c) brows[c] = b.row(j0 + c);
    const int64_t panels = (n + kNR - 1) / kNR;
    if (amx) amx_begin();
    if (amx && packed != nullptr && words % 16 == 0 && m % 32 == 0 && a.stride % 2 == 0 && a.index == nullptr) {
      // The whole k range in one kernel call per 32 x 32 block (C stays in the tiles: no store and reload per
      // chunk), A tiles loaded from the rows in place; each B panel is used for every row block in turn.
      const int64_t lda = a.stride / 2;
      for (int64_t p = 0; p < panels; ++p) {
        for (int64_t r0 = 0; r0 < m; r0 += 32) {
          kernel_amx(static_cast<const uint32_t*>(a.row(i0 + r0)), 16, 16 * lda, lda * 4,
                     packed->chunk(j0 / kNR + p, 0), words / 16, result_.get() + r0 * ld() + p * kNR, ld(), false);
        }
      }
      amx_end();
      return;
    }
    for (int64_t k0 = 0; k0 < words; k0 += kKC) {
      const int64_t kc = std::min(kKC, words - k0), kcp = padded(kc);
      if (packed == nullptr) pack_b_avx512(brows, n, elem_, convert, k0, kc, words, packed_.get());
      const auto panel = [&](int64_t p) {
        return packed != nullptr ? packed->chunk(j0 / kNR + p, k0) : packed_.get() + p * kcp * kNR;
      };
      if (amx) {
        const int64_t mpad = (m + 31) / 32 * 32, steps = kcp / 16;
        // Tiles that cannot take the whole k at once (edges, B packed per tile): k-chunk by k-chunk, A tiles in
        // place where whole 32-row blocks of whole steps allow, else from a zero-padded copy (AMX loads whole tiles).
        const bool inplace = m % 32 == 0 && kc == kcp && a.stride % 2 == 0 && a.index == nullptr;
        if (!inplace) pack_a_pairs(a, i0, m, mpad, k0, kc, kcp);
        const uint32_t* apack = reinterpret_cast<const uint32_t*>(converted_.get());
        for (int64_t p = 0; p < panels; ++p) {
          for (int64_t r0 = 0; r0 < m; r0 += 32) {
            float* c = result_.get() + r0 * ld() + p * kNR;
            if (inplace) {
              const int64_t lda = a.stride / 2;
              kernel_amx(static_cast<const uint32_t*>(a.row(i0 + r0)) + k0, 16, 16 * lda, lda * 4, panel(p), steps, c,
                         ld(), k0 > 0);
            } else {
              kernel_amx(apack + r0 * 16, mpad * 16, 16 * 16, 64, panel(p), steps, c, ld(), k0 > 0);
            }
          }
        }
        continue;
      }
      if (convert) convert_rows(a, i0, m, k0, kc);
      for (int64_t r0 = 0; r0 < m; r0 += kMR) {
        const int rows = static_cast<int>(std::min<int64_t>(kMR, m - r0));
        const void* arows[kMR];
        for (int r = 0; r < rows; ++r) {
          arows[r] = convert ? static_cast<const void*>(converted_.get() + (r0 + r) * kKC)
                             : static_cast<const void*>(static_cast<const uint32_t*>(a.row(i0 + r0 + r)) + k0);
        }
        for (int64_t p = 0; p < panels; ++p) {
          if (upper && j0 + (p + 1) * kNR <= i0 + r0) continue;  // every column below every row
          float* c = result_.get() + r0 * ld() + p * kNR;
          const float* bp = panel(p);
          if (pairs) {
            kernel_bf16_rows(rows)(reinterpret_cast<const uint32_t* const*>(arows), bp, kc, c, ld(), k0 > 0);
          } else {
            kernel_f32_rows(rows)(reinterpret_cast<const float* const*>(arows), bp, kc, c, ld(), k0 > 0);
          }
        }
      }
    }
    if (amx) amx_end();
  }

  // compute_masked for float32 and converted rows: per needed panel, the k-chunks in order, each packed (and the
  // needing rows converted) as compute_avx512 does it and multiplied into a compact [rows that need the panel][32]
  // block, which is then scattered into the result.
  MRPRUNE_AVX512 void masked_rows(const RowMatrix& a, int64_t i0, int64_t m, const RowMatrix& b, int64_t j0,
                                  int64_t n, const uint8_t* need, bool convert) {
    const int64_t d = a.d;
    int64_t rows[kMaxRows];
    float* block = compact_.get();  // [rows][32]
    for (int64_t p = 0; p * kNR < n; ++p) {
      const int64_t c0 = p * kNR, cols = std::min<int64_t>(kNR, n - c0);
      int64_t count = 0;
      for (int64_t r = 0; r < m; ++r) {
        const uint8_t* flags = need + r * kMaxCols + c0;
        if (std::any_of(flags, flags + cols, [](uint8_t f) { return f != 0; })) rows[count++] = r;
      }
      if (count == 0) continue;
      const void* brows[kNR];
      for (int64_t c = 0; c < cols; ++c) brows[c] = b.row(j0 + c0 + c);
      for (int64_t k0 = 0; k0 < d; k0 += kKC) {
        const int64_t kc = std::min(kKC, d - k0);
        pack_b_avx512(brows, cols, elem_, convert, k0, kc, d, packed_.get());
        for (int64_t q = 0; convert && q < count; ++q) {
          convert_row(a.row(i0 + rows[q]), k0, kc, converted_.get() + q * kKC);
        }
        for (int64_t g = 0; g < count; g += kMR) {
          const int group = static_cast<int>(std::min<int64_t>(kMR, count - g));
          const float* arows[kMR];
          for (int q = 0; q < group; ++q) {
            arows[q] = convert ? converted_.get() + (g + q) * kKC
                               : static_cast<const float*>(a.row(i0 + rows[g + q])) + k0;
          }
          kernel_f32_rows(group)(arows, packed_.get(), kc, block + g * kNR, kNR, k0 > 0);
        }
      }
      for (int64_t q = 0; q < count; ++q) {
        std::copy(block + q * kNR, block + q * kNR + cols, result_.get() + rows[q] * ld() + c0);
      }
    }
  }

  // The k-chunk of A rows i0 .. i0 + m as AMX tiles: buf[(s * mpad + r) * 16 + q] = pair k0 + 16 s + q of row r,
  // rows [m, mpad) and pairs [kc, kcp) zero.
  MRPRUNE_AVX512 void pack_a_pairs(const RowMatrix& a, int64_t i0, int64_t m, int64_t mpad, int64_t k0, int64_t kc,
                                   int64_t kcp) {
    float* buf = converted_.get();
    for (int64_t r = 0; r < mpad; ++r) {
      if (r >= m) {
        for (int64_t s = 0; s < kcp / 16; ++s) _mm512_storeu_ps(buf + (s * mpad + r) * 16, _mm512_setzero_ps());
        continue;
      }
      const void* row = static_cast<const uint32_t*>(a.row(i0 + r));
      for (int64_t s = 0; s < kcp / 16; ++s) {
        _mm512_storeu_ps(buf + (s * mpad + r) * 16, load_words(row, k0 + s * 16, k0 + kc));
      }
    }
  }

  // float32 copies of the k-chunk of the A rows (float16, or bfloat16 without VDPBF16PS).
  MRPRUNE_AVX512 void convert_rows(const RowMatrix& a, int64_t i0, int64_t m, int64_t k0, int64_t kc) {
    for (int64_t r = 0; r < m; ++r) convert_row(a.row(i0 + r), k0, kc, converted_.get() + r * kKC);
  }

  MRPRUNE_AVX512 void convert_row(const void* row, int64_t k0, int64_t kc, float* dst) {
    for (int64_t k = 0; k < kc; k += 16) {
      const int64_t left = kc - k;
      const __mmask16 mask = left >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << left) - 1);
      _mm512_mask_storeu_ps(dst + k, mask, dots::load16(row, elem_, k0 + k, mask));
    }
  }
#endif

  Elem elem_;
  bool avx512_ = false;
  std::unique_ptr<float[]> packed_, result_, converted_, compact_, portable_a_;
};

}  // namespace mrprune::cpu::gemm
