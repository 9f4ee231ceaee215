// Per-element cast + statistics shared by the CPU and CUDA pack kernels.
//
// Written without branches so that the CPU loop auto-vectorizes: GCC does not if-convert the
// conversions in common/types.h (they are tuned for scalar use), so the host path here uses
// mask-and-select formulations of the same round-to-nearest-even arithmetic (bit-identical; the
// tests compare them with torch over every float16 and a sweep of float32 values). |x| is tracked
// as the bits of the source value: for non-negative IEEE numbers the bit patterns order like the
// values, and an integer max vectorizes where a float max (with its NaN rules) does not.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/types.h"

namespace pyfast {
namespace pack {

// ---- host-side vector-friendly conversions (the device uses the CUDA intrinsics) ----

PYFAST_HD uint16_t half_bits_rne(float f) {
#if defined(__CUDA_ARCH__)
  return float_to_half(f).bits;
#else
  // c10::Half's fp16_ieee_from_fp32_value with the data-dependent choices written as selects.
  const uint32_t w = float_to_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  const float abs_f = bits_to_float(w & 0x7FFFFFFFu);
  float base = (abs_f * 0x1.0p+112f) * 0x1.0p-110f;
  base = bits_to_float((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = float_to_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x7C00u) + (bits & 0x0FFFu);
  const uint32_t nan_mask = 0u - static_cast<uint32_t>(shl1_w > 0xFF000000u);
  return static_cast<uint16_t>((sign >> 16) | (nonsign & ~nan_mask) | (0x7E00u & nan_mask));
#endif
}

PYFAST_HD uint16_t bfloat16_bits_rne(float f) {
#if defined(__CUDA_ARCH__)
  return float_to_bfloat16(f).bits;
#else
  const uint32_t u = float_to_bits(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const uint32_t nan_mask = 0u - static_cast<uint32_t>((u & 0x7FFFFFFFu) > 0x7F800000u);
  return static_cast<uint16_t>((rounded & ~nan_mask) | (0x7FC0u & nan_mask));  // canonical NaN, as c10
#endif
}

PYFAST_HD float half_to_float_rne(Half h) {
#if defined(__CUDA_ARCH__)
  return half_to_float(h);
#else
  const uint32_t w = static_cast<uint32_t>(h.bits) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const uint32_t normalized = float_to_bits(bits_to_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f);
  const uint32_t denormalized = float_to_bits(bits_to_float((two_w >> 17) | (126u << 23)) - 0.5f);
  const uint32_t denormal_mask = 0u - static_cast<uint32_t>(two_w < (1u << 27));
  return bits_to_float(sign | (denormalized & denormal_mask) | (normalized & ~denormal_mask));
#endif
}

// ---- targets ----

template <class D> struct Target;
template <> struct Target<Half> {
  static constexpr uint16_t kInf = 0x7C00, kMax = 0x7BFF;
  PYFAST_HD static uint16_t from_float(float f) { return half_bits_rne(f); }
};
template <> struct Target<BFloat16> {
  static constexpr uint16_t kInf = 0x7F80, kMax = 0x7F7F;
  PYFAST_HD static uint16_t from_float(float f) { return bfloat16_bits_rne(f); }
};

// ---- sources: |x| as bits, the infinity threshold, and the float the cast goes through ----
// (torch casts double -> float -> 16 bit, and so do we).

template <class S> struct Source;
template <> struct Source<float> {
  using Bits = uint32_t;
  static constexpr Bits kInf = 0x7F800000u;
  PYFAST_HD static Bits abs_bits(float x) { return float_to_bits(x) & 0x7FFFFFFFu; }
  PYFAST_HD static float to_float(float x) { return x; }
  PYFAST_HD static double abs_value(Bits b) { return bits_to_float(b); }
};
template <> struct Source<double> {
  using Bits = int64_t;  // signed: AVX2 has a signed 64-bit compare, and |x| bits are non-negative
  static constexpr Bits kInf = 0x7FF0000000000000ll;
  PYFAST_HD static Bits abs_bits(double x) {
#if defined(__CUDA_ARCH__)
    return __double_as_longlong(x) & 0x7FFFFFFFFFFFFFFFll;
#else
    int64_t b;
    std::memcpy(&b, &x, sizeof(b));
    return b & 0x7FFFFFFFFFFFFFFFll;
#endif
  }
  PYFAST_HD static float to_float(double x) { return static_cast<float>(x); }
  PYFAST_HD static double abs_value(Bits b) {
#if defined(__CUDA_ARCH__)
    return __longlong_as_double(b);
#else
    double d;
    std::memcpy(&d, &b, sizeof(d));
    return d;
#endif
  }
};
template <> struct Source<Half> {
  using Bits = uint32_t;  // widened so the lanes match the float lanes of the conversion
  static constexpr Bits kInf = 0x7C00u;
  PYFAST_HD static Bits abs_bits(Half x) { return x.bits & 0x7FFFu; }
  PYFAST_HD static float to_float(Half x) { return half_to_float_rne(x); }
  PYFAST_HD static double abs_value(Bits b) { return half_to_float(Half{static_cast<uint16_t>(b)}); }
};
template <> struct Source<BFloat16> {
  using Bits = uint32_t;
  static constexpr Bits kInf = 0x7F80u;
  PYFAST_HD static Bits abs_bits(BFloat16 x) { return x.bits & 0x7FFFu; }
  PYFAST_HD static float to_float(BFloat16 x) { return bfloat16_to_float(x); }
  PYFAST_HD static double abs_value(Bits b) { return bfloat16_to_float(BFloat16{static_cast<uint16_t>(b)}); }
};

// Casts one value and updates the two counters and the running max of |x| (bits, finite values
// only). A value overflows when it is finite but its cast is +-inf; with kSaturate it becomes
// +-max instead.
template <class S, class D, bool kSaturate, class C>
PYFAST_HD uint16_t convert(S x, C& nonfinite, C& overflow, typename Source<S>::Bits& amax) {
  using Bits = typename Source<S>::Bits;
  const Bits a = Source<S>::abs_bits(x);
  const bool finite = a < Source<S>::kInf;
  uint16_t out;
  if constexpr (std::is_same<S, D>::value) {
    out = x.bits;  // same dtype: the bits are the value, NaN payloads included (as .to() keeps them)
  } else {
    out = Target<D>::from_float(Source<S>::to_float(x));
  }
  const bool over = finite & ((out & 0x7FFFu) == Target<D>::kInf);
  if (kSaturate) out = over ? static_cast<uint16_t>((out & 0x8000u) | Target<D>::kMax) : out;
  nonfinite += static_cast<C>(!finite);
  overflow += static_cast<C>(over);
  const Bits masked = a & (Bits(0) - static_cast<Bits>(finite));  // a mask, not a select: see the top
  amax = amax > masked ? amax : masked;
  return out;
}

}  // namespace pack
}  // namespace pyfast
