// cudaemu: CUDA's warp matrix multiply-accumulate (mma.h, namespace nvcuda::wmma) for the CPU emulation (see
// cuda_runtime.h), the subset that mrprune's device code uses: __half / __nv_bfloat16 matrix_a and matrix_b fragments
// (row_major or col_major), float accumulators, shapes m16n16k16, m32n8k16 and m8n32k16; fill_fragment,
// load_matrix_sync, store_matrix_sync and mma_sync.
//
// Emulation model: every lane holds the WHOLE tile (fragment::num_elements = rows * cols, x[] in row-major order of
// the tile: a is M x K, b is K x N, the accumulator M x N). Element-wise operations that treat every x[i] alike (the
// only portable ones: the hardware's element-to-lane mapping is unspecified) therefore behave as on the GPU. Not
// emulated: the hardware's num_elements (8 per lane for m16n16k16 float) and element order, so code that relies on
// them (per-lane indexing of x[]) is not portable and is diagnosed where it makes the lanes' tiles differ.
//
// Every function is a warp collective (cudaemu::warp_uniform): the 32 lanes of the warp must all call it at the same
// call site with the same arguments, or the run ends with exit code 86 and a diagnosis naming the function and the
// caller's line (std::source_location). Checked as well:
//   * pointers 32-byte (256-bit) aligned; ldm a multiple of 16 bytes (8 elements of 16 bits, 4 floats); a store's ldm
//     at least its tile's row (mem_row_major) or column (mem_col_major) length;
//   * the lanes' fragments are identical at mma_sync and store_matrix_sync (a lane-dependent x[] update, or an
//     uninitialised accumulator, is diagnosed), and so are the tiles the lanes read in load_matrix_sync: each lane
//     reads memory BEFORE the collective, so a tile still being written by other lanes (a missing __syncwarp or
//     __syncthreads) shows up as different tiles, and as a data race under ThreadSanitizer;
//   * store_matrix_sync meets the other lanes first (arguments checked before anything is written), then lane L
//     writes only the elements e (row-major index in the tile) with e % 32 == L: each element by one lane, as on the
//     GPU;
//   * for ThreadSanitizer, load_matrix_sync and store_matrix_sync order no memory accesses between the lanes (CUDA
//     promises none): lanes that read what other lanes stored, or overwrite what they read, need a __syncwarp (or
//     __syncthreads) in between. mma_sync does order them (it consumes every lane's fragments, so each lane's loads
//     are complete before it and its results exist only after it): C loaded, updated and stored in place is fine.
// mma_sync computes d = a * b + c in float: each product of two 16-bit inputs is exact in float, and element (i, j)
// sums in k order, starting from c(i, j), each step one correctly rounded fma. Real tensor cores add in an unspecified
// order (and internal precision): test kernels with tolerances, never bitwise against a CPU reference.
#pragma once

#if !defined(MRPRUNE_CUDA_EMULATION)
#error "csrc/emu/mma.h is the CPU emulation of CUDA: build with -DMRPRUNE_CUDA_EMULATION"
#endif

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <source_location>
#include <type_traits>

#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "cuda_runtime.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

namespace detail {

template <class Use, int M, int N, int K>
struct tile_shape;
template <int M, int N, int K>
struct tile_shape<matrix_a, M, N, K> {
  static constexpr int rows = M, cols = K;
};
template <int M, int N, int K>
struct tile_shape<matrix_b, M, N, K> {
  static constexpr int rows = K, cols = N;
};
template <int M, int N, int K>
struct tile_shape<accumulator, M, N, K> {
  static constexpr int rows = M, cols = N;
};

template <int M, int N, int K>
constexpr bool kSupportedShape = K == 16 && ((M == 16 && N == 16) || (M == 32 && N == 8) || (M == 8 && N == 32));

template <class T>
constexpr bool kSixteenBit = std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>;

inline float to_float(__half v) { return __half2float(v); }
inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// The lane of the running CUDA thread (threads are numbered x fastest, as on the GPU).
inline unsigned lane_id() {
  return (threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)) & 31u;
}

// A 64-bit digest of a fragment's bytes (lanes must hold identical fragments).
template <class Frag>
uint64_t digest(const Frag& f) {
  static_assert(sizeof(f.x) % 8 == 0, "fragments are whole 8-byte words");
  const auto* bytes = reinterpret_cast<const unsigned char*>(f.x);
  uint64_t h = 0xcbf29ce484222325ull;
  for (size_t i = 0; i < sizeof(f.x); i += 8) {
    uint64_t word;
    std::memcpy(&word, bytes + i, 8);
    h = (h ^ word) * 0x100000001b3ull;
    h ^= h >> 29;
  }
  return h;
}

inline uint64_t address(const void* p) { return static_cast<uint64_t>(reinterpret_cast<uintptr_t>(p)); }

// The whole warp meets at the call; `args` must agree across its lanes. `orders_memory`: for ThreadSanitizer, what
// each lane did before happens before what every lane does after (see the header: mma_sync only).
template <int Count>
void meet(const char* name, const uint64_t (&args)[Count], const char* const (&labels)[Count], bool orders_memory,
          const std::source_location& at) {
  ::cudaemu::warp_uniform(name, 0xffffffffu, Count, args, labels, orders_memory, static_cast<int>(at.line()),
                          at.file_name());
}

// WMMA's memory requirements: a 256-bit aligned pointer, ldm a multiple of 16 bytes.
inline void check_memory(const char* name, const void* p, unsigned ldm, size_t element_bytes,
                         const std::source_location& at) {
  if (address(p) % 32 != 0) {
    ::cudaemu::kernel_error(static_cast<int>(at.line()), at.file_name(),
                            "%s: pointer %p is not 32-byte aligned (WMMA needs 256-bit aligned pointers)", name, p);
  }
  const unsigned multiple = static_cast<unsigned>(16 / element_bytes);
  if (ldm % multiple != 0) {
    ::cudaemu::kernel_error(static_cast<int>(at.line()), at.file_name(),
                            "%s: ldm %u is not a multiple of %u (16 bytes of %zu-byte elements)", name, ldm, multiple,
                            element_bytes);
  }
}

template <class Frag, class T>
void read_tile(Frag& f, const T* p, unsigned ldm, bool col_major) {
  constexpr int rows = Frag::rows, cols = Frag::cols;
  for (int r = 0; r < rows; ++r) {
    for (int c = 0; c < cols; ++c) {
      const size_t at = col_major ? static_cast<size_t>(c) * ldm + r : static_cast<size_t>(r) * ldm + c;
      f.x[r * cols + c] = p[at];
    }
  }
}

template <class Frag>
void load_operand(const char* name, Frag& f, const typename Frag::element_type* p, unsigned ldm, bool col_major,
                  const std::source_location& at) {
  check_memory(name, p, ldm, sizeof(*p), at);
  read_tile(f, p, ldm, col_major);  // before meeting the other lanes: see the header
  static const char* const labels[] = {"pointer", "ldm",
                                       "tile read from memory (written while the lanes read it: a missing barrier?)"};
  meet(name, {address(p), ldm, digest(f)}, labels, false, at);
}

}  // namespace detail

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static_assert(detail::kSupportedShape<M, N, K>, "cudaemu: WMMA shapes m16n16k16, m32n8k16, m8n32k16 only");
  static_assert(std::is_same_v<Use, matrix_a> || std::is_same_v<Use, matrix_b> || std::is_same_v<Use, accumulator>,
                "cudaemu: fragment use is matrix_a, matrix_b or accumulator");
  static_assert(!std::is_same_v<Use, accumulator> || (std::is_same_v<T, float> && std::is_void_v<Layout>),
                "cudaemu: float accumulators without a layout only");
  static_assert(std::is_same_v<Use, accumulator> || (detail::kSixteenBit<T> && (std::is_same_v<Layout, row_major> ||
                                                                                std::is_same_v<Layout, col_major>)),
                "cudaemu: matrix_a / matrix_b fragments of __half or __nv_bfloat16, row_major or col_major");

  static constexpr int rows = detail::tile_shape<Use, M, N, K>::rows;
  static constexpr int cols = detail::tile_shape<Use, M, N, K>::cols;
  static constexpr int num_elements = rows * cols;  // the whole tile in every lane (CUDA: the lane's share)
  using element_type = T;
  using storage_element_type = T;
  T x[num_elements];  // row-major over the tile (not the hardware's order)
};

template <class Use, int M, int N, int K, class T, class Layout>
inline void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, const std::type_identity_t<T>& v,
                          std::source_location at = std::source_location::current()) {
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  static const char* const labels[] = {"value"};
  detail::meet("nvcuda::wmma::fill_fragment", {bits}, labels, false, at);
  for (int i = 0; i < f.num_elements; ++i) f.x[i] = v;
}

// A 16-bit fragment filled from a float (CUDA converts through __half's / __nv_bfloat16's constructor; the emulated
// types have none, see cuda_fp16.h): rounded to nearest even.
template <class Use, int M, int N, int K, class T, class Layout>
  requires detail::kSixteenBit<T>
inline void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, float v,
                          std::source_location at = std::source_location::current()) {
  if constexpr (std::is_same_v<T, __half>) {
    fill_fragment(f, __float2half_rn(v), at);
  } else {
    fill_fragment(f, __float2bfloat16_rn(v), at);
  }
}

template <int M, int N, int K, class T, class Layout>
inline void load_matrix_sync(fragment<matrix_a, M, N, K, T, Layout>& f, const std::type_identity_t<T>* p, unsigned ldm,
                             std::source_location at = std::source_location::current()) {
  detail::load_operand("nvcuda::wmma::load_matrix_sync", f, p, ldm, std::is_same_v<Layout, col_major>, at);
}

template <int M, int N, int K, class T, class Layout>
inline void load_matrix_sync(fragment<matrix_b, M, N, K, T, Layout>& f, const std::type_identity_t<T>* p, unsigned ldm,
                             std::source_location at = std::source_location::current()) {
  detail::load_operand("nvcuda::wmma::load_matrix_sync", f, p, ldm, std::is_same_v<Layout, col_major>, at);
}

template <int M, int N, int K>
inline void load_matrix_sync(fragment<accumulator, M, N, K, float>& f, const float* p, unsigned ldm, layout_t layout,
                             std::source_location at = std::source_location::current()) {
  constexpr const char* name = "nvcuda::wmma::load_matrix_sync";
  detail::check_memory(name, p, ldm, sizeof(float), at);
  detail::read_tile(f, p, ldm, layout == mem_col_major);
  static const char* const labels[] = {"pointer", "ldm | layout << 32",
                                       "tile read from memory (written while the lanes read it: a missing barrier?)"};
  detail::meet(name, {detail::address(p), ldm | static_cast<uint64_t>(layout) << 32, detail::digest(f)}, labels, false,
               at);
}

template <int M, int N, int K>
inline void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t layout,
                              std::source_location at = std::source_location::current()) {
  using Frag = fragment<accumulator, M, N, K, float>;
  constexpr const char* name = "nvcuda::wmma::store_matrix_sync";
  detail::check_memory(name, p, ldm, sizeof(float), at);
  const bool col_major = layout == mem_col_major;
  const unsigned line_length = col_major ? Frag::rows : Frag::cols;
  if (ldm < line_length) {
    ::cudaemu::kernel_error(static_cast<int>(at.line()), at.file_name(),
                            "%s: ldm %u is shorter than the tile's %s (%u): lanes would write the same elements", name,
                            ldm, col_major ? "columns" : "rows", line_length);
  }
  static const char* const labels[] = {"pointer", "ldm | layout << 32",
                                       "accumulator fragment (lane-dependent or uninitialised contents?)"};
  detail::meet(name, {detail::address(p), ldm | static_cast<uint64_t>(layout) << 32, detail::digest(f)}, labels, false,
               at);
  // Lane L writes the elements e with e % 32 == L: each element by one lane, as on the GPU.
  for (int e = static_cast<int>(detail::lane_id()); e < Frag::num_elements; e += 32) {
    const int r = e / Frag::cols, c = e % Frag::cols;
    p[col_major ? static_cast<size_t>(c) * ldm + r : static_cast<size_t>(r) * ldm + c] = f.x[e];
  }
}

// d = a * b + c (d may be c). satf (saturation, deprecated in CUDA) is not emulated.
template <int M, int N, int K, class T, class LayoutA, class LayoutB>
inline void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LayoutA>& a,
                     const fragment<matrix_b, M, N, K, T, LayoutB>& b, const fragment<accumulator, M, N, K, float>& c,
                     bool satf = false, std::source_location at = std::source_location::current()) {
  constexpr const char* name = "nvcuda::wmma::mma_sync";
  if (satf) ::cudaemu::kernel_error(static_cast<int>(at.line()), at.file_name(), "%s: satf is not emulated", name);
  static const char* const labels[] = {"fragment a (lane-dependent or uninitialised contents?)",
                                       "fragment b (lane-dependent or uninitialised contents?)",
                                       "fragment c (lane-dependent or uninitialised contents?)"};
  detail::meet(name, {detail::digest(a), detail::digest(b), detail::digest(c)}, labels, true, at);
  float af[M * K], bt[N * K];  // a row-major, b transposed: both contiguous along k
  for (int i = 0; i < M * K; ++i) af[i] = detail::to_float(a.x[i]);
  for (int k = 0; k < K; ++k) {
    for (int j = 0; j < N; ++j) bt[j * K + k] = detail::to_float(b.x[k * N + j]);
  }
  for (int i = 0; i < M; ++i) {
    for (int j = 0; j < N; ++j) {
      float s = c.x[i * N + j];  // read before d's element is written: d may be c
      for (int k = 0; k < K; ++k) s = std::fma(af[i * K + k], bt[j * K + k], s);
      d.x[i * N + j] = s;
    }
  }
}

}  // namespace wmma
}  // namespace nvcuda
