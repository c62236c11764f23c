// cudaemu: CUDA's bfloat16 type (cuda_bf16.h) for the CPU emulation (see cuda_runtime.h), the subset that mrprune's
// device code uses: storage, conversions and bit casts.
//
// __nv_bfloat16 is the upper half of an IEEE binary32 (trivially copyable, sizeof 2, alignof 2, uninitialised when
// default initialised, like CUDA's). __bfloat162float (and the implicit operator float) is exact (the bits shifted up
// by 16); __float2bfloat16_rn (and __float2bfloat16) rounds to nearest even like cvt.rn.bf16.f32, overflowing to
// infinity, and every NaN becomes the canonical NaN 0x7fff, as CUDA's own host code does.
// Not emulated: the constructors (an aggregate, see cuda_fp16.h: write __float2bfloat16_rn(v)), bfloat16 arithmetic
// and comparisons (deleted, see cuda_fp16.h), __nv_bfloat162 and the bf16 intrinsics. Convert to float explicitly.
#pragma once

#if !defined(MRPRUNE_CUDA_EMULATION)
#error "csrc/emu/cuda_bf16.h is the CPU emulation of CUDA: build with -DMRPRUNE_CUDA_EMULATION"
#endif

#include <bit>
#include <cstdint>
#include <type_traits>

#include "cuda_fp16.h"  // CUDAEMU_DELETE_OPERATORS

namespace cudaemu {

constexpr float bfloat16_bits_to_float(uint16_t b) { return std::bit_cast<float>(static_cast<uint32_t>(b) << 16); }

// float -> bfloat16 bits, rounded to nearest even (a carry bumps the exponent, up to infinity); NaN -> 0x7fff.
constexpr uint16_t float_to_bfloat16_bits(float f) {
  const uint32_t x = std::bit_cast<uint32_t>(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

}  // namespace cudaemu

struct __nv_bfloat16 {
  unsigned short __x;
  operator float() const { return ::cudaemu::bfloat16_bits_to_float(__x); }  // NOLINT: implicit, like CUDA's
};
using nv_bfloat16 = __nv_bfloat16;
static_assert(sizeof(__nv_bfloat16) == 2 && alignof(__nv_bfloat16) == 2, "__nv_bfloat16 is 16 bits");
static_assert(std::is_trivial_v<__nv_bfloat16> && std::is_standard_layout_v<__nv_bfloat16>,
              "__nv_bfloat16 is plain 16-bit storage");

CUDAEMU_DELETE_OPERATORS(__nv_bfloat16)

inline float __bfloat162float(__nv_bfloat16 b) { return ::cudaemu::bfloat16_bits_to_float(b.__x); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  __nv_bfloat16 b;
  b.__x = ::cudaemu::float_to_bfloat16_bits(f);
  return b;
}
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }
inline short __bfloat16_as_short(__nv_bfloat16 b) { return static_cast<short>(b.__x); }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short bits) {
  __nv_bfloat16 b;
  b.__x = bits;
  return b;
}
inline __nv_bfloat16 __short_as_bfloat16(short bits) { return __ushort_as_bfloat16(static_cast<unsigned short>(bits)); }
