// cudaemu: CUDA's half-precision type (cuda_fp16.h) for the CPU emulation (see cuda_runtime.h), the subset that
// mrprune's device code uses: storage, conversions and bit casts.
//
// __half is IEEE binary16 in 16 bits (trivially copyable, sizeof 2, alignof 2, uninitialised when default
// initialised, like CUDA's). Conversions are portable bit code, identical on every host:
//   * __half2float (and the implicit operator float) is exact (subnormals, infinities and NaN payloads included);
//   * __float2half_rn (and __float2half) round to nearest even like cvt.rn.f16.f32: subnormal results, overflow to
//     infinity from 65520 up, and every NaN becomes the canonical NaN 0x7fff, as CUDA's own host code does.
// Not emulated:
//   * the constructors (CUDA's __half(float), __half(double), ...): __half is an aggregate here, because GCC guards
//     the initialisation of a thread_local (`__shared__`) array of any class with constructors, and ThreadSanitizer
//     reports that guard as a race between the CUDA threads of a block. Write __float2half_rn(v), not __half(v);
//   * half arithmetic and comparisons (the operators and intrinsics of cuda_fp16.hpp, __hadd, __hmul, half2, ...):
//     the operators between two halves are deleted, so device code that would compute in half precision on the GPU
//     fails to compile instead of silently computing in float. Convert to float explicitly.
#pragma once

#if !defined(MRPRUNE_CUDA_EMULATION)
#error "csrc/emu/cuda_fp16.h is the CPU emulation of CUDA: build with -DMRPRUNE_CUDA_EMULATION"
#endif

#include <bit>
#include <cstdint>
#include <type_traits>

namespace cudaemu {

// IEEE binary16 bits -> float, exact.
constexpr float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
  if (exponent == 0x1fu) return std::bit_cast<float>(sign | 0x7f800000u | (mantissa << 13));  // inf, NaN
  if (exponent != 0) return std::bit_cast<float>(sign | ((exponent + 112u) << 23) | (mantissa << 13));
  // zero or subnormal: mantissa * 2^-24, exact in float
  const float magnitude = static_cast<float>(mantissa) * 0x1p-24f;
  return sign != 0 ? -magnitude : magnitude;
}

// float -> IEEE binary16 bits, rounded to nearest even; NaN -> 0x7fff.
constexpr uint16_t float_to_half_bits(float f) {
  const uint32_t x = std::bit_cast<uint32_t>(f);
  const uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return 0x7fffu;                              // NaN
  if (ax >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520 (ties to even: 65536), inf
  if (ax >= 0x38800000u) {  // normal half (>= 2^-14): rebias, round the 13 dropped bits (a carry bumps the exponent)
    const uint32_t t = ax - 0x38000000u;
    return static_cast<uint16_t>(sign | ((t + 0xfffu + ((t >> 13) & 1u)) >> 13));
  }
  // subnormal half: RNE(|f| * 2^24) = RNE(significand >> (126 - exponent)); below 2^-25 (shift > 24) it is 0
  const uint32_t exponent = ax >> 23;
  if (exponent < 102u) return static_cast<uint16_t>(sign);
  const uint32_t significand = (ax & 0x7fffffu) | 0x800000u, shift = 126u - exponent;  // 14..24
  uint32_t q = significand >> shift;
  const uint32_t rest = significand & ((1u << shift) - 1u), halfway = 1u << (shift - 1u);
  if (rest > halfway || (rest == halfway && (q & 1u) != 0)) ++q;  // 1024 is the smallest normal: still right
  return static_cast<uint16_t>(sign | q);
}

}  // namespace cudaemu

struct __half {
  unsigned short __x;
  operator float() const { return ::cudaemu::half_bits_to_float(__x); }  // NOLINT: implicit, like CUDA's
};
using half = __half;
static_assert(sizeof(__half) == 2 && alignof(__half) == 2, "__half is 16 bits");
static_assert(std::is_trivial_v<__half> && std::is_standard_layout_v<__half>, "__half is plain 16-bit storage");

// Half-precision arithmetic and comparisons are not emulated (see above): deleted, not silently done in float.
#define CUDAEMU_DELETE_OPERATORS(T)                                                                          \
  T operator+(const T&, const T&) = delete;                                                                  \
  T operator-(const T&, const T&) = delete;                                                                  \
  T operator*(const T&, const T&) = delete;                                                                  \
  T operator/(const T&, const T&) = delete;                                                                  \
  T& operator+=(T&, const T&) = delete;                                                                      \
  T& operator-=(T&, const T&) = delete;                                                                      \
  T& operator*=(T&, const T&) = delete;                                                                      \
  T& operator/=(T&, const T&) = delete;                                                                      \
  T operator-(const T&) = delete;                                                                            \
  bool operator==(const T&, const T&) = delete;                                                              \
  bool operator!=(const T&, const T&) = delete;                                                              \
  bool operator<(const T&, const T&) = delete;                                                               \
  bool operator<=(const T&, const T&) = delete;                                                              \
  bool operator>(const T&, const T&) = delete;                                                               \
  bool operator>=(const T&, const T&) = delete;
CUDAEMU_DELETE_OPERATORS(__half)

inline float __half2float(__half h) { return ::cudaemu::half_bits_to_float(h.__x); }
inline __half __float2half_rn(float f) {
  __half h;
  h.__x = ::cudaemu::float_to_half_bits(f);
  return h;
}
inline __half __float2half(float f) { return __float2half_rn(f); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline short __half_as_short(__half h) { return static_cast<short>(h.__x); }
inline __half __ushort_as_half(unsigned short bits) {
  __half h;
  h.__x = bits;
  return h;
}
inline __half __short_as_half(short bits) { return __ushort_as_half(static_cast<unsigned short>(bits)); }
