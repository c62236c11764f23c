// Single fixed-order dot products of feature rows stored as float32, bfloat16 or float16, with float32 accumulation:
// row norms, a row against a float32 vector (the greedy selection's basis form), and two rows (the streaming
// selections' recomputed cosine rows). Gram tiles use gram_kernels.h instead.
//
// Each result depends only on the rows' values, never on where they sit in memory or on the thread count: 16 lane
// accumulators (lane l sums the elements k = l mod 16 in increasing k, by fused multiply-add) reduced by one fixed
// tree, and a . b == b . a bitwise. float16/bfloat16 rows are converted 16 elements at a time in registers (never as
// a whole); a product of two half-precision values is exact in float32, so the results equal the float32 ones on
// upcast rows bit for bit.
//
// Torch-free: plain C++17 plus x86 intrinsics in functions compiled for AVX-512 by target attributes and chosen at
// run time (isa()), so the extension still loads on CPUs without AVX-512; the portable loops give the same results.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MRPRUNE_X86_AVX512 1
#include <cpuid.h>
#include <immintrin.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#endif

namespace mrprune::cpu::dots {

enum class Elem : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

inline int64_t elem_size(Elem e) { return e == Elem::kFloat32 ? 4 : 2; }

inline float bf16_to_float(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline float f16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu, bits;
  if (exponent == 0x1f) {
    bits = sign | 0x7f800000u | (mantissa << 13);
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    exponent = 113;
    while ((mantissa & 0x400u) == 0) mantissa <<= 1, --exponent;
    bits = sign | (exponent << 23) | ((mantissa & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline float load(const void* row, Elem e, int64_t k) {
  switch (e) {
    case Elem::kFloat32:
      return static_cast<const float*>(row)[k];
    case Elem::kBFloat16:
      return bf16_to_float(static_cast<const uint16_t*>(row)[k]);
    default:
      return f16_to_float(static_cast<const uint16_t*>(row)[k]);
  }
}

// The fixed reduction tree of the 16 lanes: l += l + 8, then l + 4, l + 2, l + 1 (what the AVX-512 code does with
// 256-, 128-, 64- and 32-bit halves).
inline float reduce_lanes(float* lane) {
  for (int width = 8; width >= 1; width /= 2) {
    for (int l = 0; l < width; ++l) lane[l] += lane[l + width];
  }
  return lane[0];
}

// Portable a . b (rows of element type e, d elements); bit-identical to the AVX-512 float32 path.
inline float dot_portable(const void* a, const void* b, Elem e, int64_t d) {
  float lane[16] = {0.f};
  for (int64_t k = 0; k < d; ++k) lane[k % 16] = std::fma(load(a, e, k), load(b, e, k), lane[k % 16]);
  return reduce_lanes(lane);
}

// Portable a . v for a row a of type e against a float32 vector v, same order as dot_portable.
inline float dot_vec_portable(const void* a, Elem e, const float* v, int64_t d) {
  float lane[16] = {0.f};
  for (int64_t k = 0; k < d; ++k) lane[k % 16] = std::fma(load(a, e, k), v[k], lane[k % 16]);
  return reduce_lanes(lane);
}

#ifdef MRPRUNE_X86_AVX512

#define MRPRUNE_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,fma")))
#define MRPRUNE_AVX512_BF16 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx512bf16,fma")))
#define MRPRUNE_AVX512_VNNI __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx512vnni,fma")))

MRPRUNE_AVX512 inline float hsum(__m512 v) {
  __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
  __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  q = _mm_add_ps(q, _mm_movehl_ps(q, q));
  q = _mm_add_ss(q, _mm_shuffle_ps(q, q, 1));
  return _mm_cvtss_f32(q);
}

// 16 elements from k as float32 (the last block zero-filled under the mask).
MRPRUNE_AVX512 inline __m512 load16(const void* row, Elem e, int64_t k, __mmask16 mask) {
  switch (e) {
    case Elem::kFloat32:
      return _mm512_maskz_loadu_ps(mask, static_cast<const float*>(row) + k);
    case Elem::kBFloat16: {
      const __m256i raw = _mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(row) + k);
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
    }
    default: {
      const __m256i raw = _mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(row) + k);
      return _mm512_cvtph_ps(raw);
    }
  }
}

// a . v for a row of type E against a float32 vector.
template <Elem E>
MRPRUNE_AVX512 float dot_vec_avx512(const void* a, const float* v, int64_t d) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t k = 0; k < d; k += 16) {
    const __mmask16 mask = d - k >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (d - k)) - 1);
    acc = _mm512_fmadd_ps(load16(a, E, k, mask), _mm512_maskz_loadu_ps(mask, v + k), acc);
  }
  return hsum(acc);
}

template <Elem E>
MRPRUNE_AVX512 float self_dot_avx512(const void* a, int64_t d) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t k = 0; k < d; k += 16) {
    const __mmask16 mask = d - k >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (d - k)) - 1);
    const __m512 x = load16(a, E, k, mask);
    acc = _mm512_fmadd_ps(x, x, acc);
  }
  return hsum(acc);
}

// a . b for two rows of type E (16 lanes, fixed tree: bit-identical to dot_portable).
template <Elem E>
MRPRUNE_AVX512 float dot_rows_avx512(const void* a, const void* b, int64_t d) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t k = 0; k < d; k += 16) {
    const __mmask16 mask = d - k >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (d - k)) - 1);
    acc = _mm512_fmadd_ps(load16(a, E, k, mask), load16(b, E, k, mask), acc);
  }
  return hsum(acc);
}

#endif  // MRPRUNE_X86_AVX512

// The instruction sets found at run time (once). MRPRUNE_CPU_ISA = portable | avx512 | avx512_bf16 | amx caps the
// level (tests use it to run every path on one machine; the default is the best the CPU and OS allow); avx512
// includes VNNI where the CPU has it (a Cascade Lake: half precision converted, screened with int8 products).
struct Isa {
  bool avx512 = false;
  bool avx512_bf16 = false;
  bool avx512_vnni = false;  // int8 dot products (VPDPBUSD): the cosine screen of gram.h
  bool amx_bf16 = false;
};

#ifdef MRPRUNE_X86_AVX512
// AMX needs the OS to grant the tile state to this process (Linux: arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)).
inline bool amx_bf16_usable() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  const bool amx_bf16 = (edx >> 22) & 1u, amx_tile = (edx >> 24) & 1u;
  if (!amx_bf16 || !amx_tile) return false;
#if defined(__linux__)
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}
#endif

inline const Isa& isa() {
  static const Isa detected = [] {
    Isa found;
#ifdef MRPRUNE_X86_AVX512
    const char* cap = std::getenv("MRPRUNE_CPU_ISA");
    const std::string level = cap != nullptr ? cap : "amx";
    if (level == "portable") return found;
    __builtin_cpu_init();
    found.avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                   __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                   __builtin_cpu_supports("fma");
    found.avx512_vnni = found.avx512 && __builtin_cpu_supports("avx512vnni");
    if (level == "avx512") return found;
    found.avx512_bf16 = found.avx512 && __builtin_cpu_supports("avx512bf16");
    if (level == "avx512_bf16") return found;
    found.amx_bf16 = found.avx512 && amx_bf16_usable();
#endif
    return found;
  }();
  return detected;
}

// a . v for a row of element type e against a float32 vector v (16 lanes, fixed tree; AVX-512 when present).
inline float dot_vec(const void* a, Elem e, const float* v, int64_t d) {
#ifdef MRPRUNE_X86_AVX512
  if (isa().avx512) {
    switch (e) {
      case Elem::kFloat32: return dot_vec_avx512<Elem::kFloat32>(a, v, d);
      case Elem::kBFloat16: return dot_vec_avx512<Elem::kBFloat16>(a, v, d);
      default: return dot_vec_avx512<Elem::kFloat16>(a, v, d);
    }
  }
#endif
  return dot_vec_portable(a, e, v, d);
}

// a . b for two rows of element type e (16 lanes, fixed tree), symmetric in a and b.
inline float dot_rows(const void* a, const void* b, Elem e, int64_t d) {
#ifdef MRPRUNE_X86_AVX512
  if (isa().avx512) {
    switch (e) {
      case Elem::kFloat32: return dot_rows_avx512<Elem::kFloat32>(a, b, d);
      case Elem::kBFloat16: return dot_rows_avx512<Elem::kBFloat16>(a, b, d);
      default: return dot_rows_avx512<Elem::kFloat16>(a, b, d);
    }
  }
#endif
  return dot_portable(a, b, e, d);
}

// ||a||^2 in the same 16-lane order.
inline float self_dot(const void* a, Elem e, int64_t d) {
#ifdef MRPRUNE_X86_AVX512
  if (isa().avx512) {
    switch (e) {
      case Elem::kFloat32: return self_dot_avx512<Elem::kFloat32>(a, d);
      case Elem::kBFloat16: return self_dot_avx512<Elem::kBFloat16>(a, d);
      default: return self_dot_avx512<Elem::kFloat16>(a, d);
    }
  }
#endif
  return dot_portable(a, a, e, d);
}

}  // namespace mrprune::cpu::dots
