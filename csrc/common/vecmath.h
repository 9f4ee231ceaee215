// exp and log1p that the host compiler can vectorize.
//
// libm's expf/log1pf are opaque calls: a loop that uses them stays scalar unless built with
// -ffast-math, which we refuse (it drops NaN propagation). These are branch-free polynomial
// versions written with selects, so -O3 turns a loop over them into SIMD code. They are
// accurate to a few ulp in float; NaN in gives NaN out. double uses libm (fp64 is for accuracy,
// not speed); CUDA device code uses the CUDA math library.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/types.h"

namespace pyfast {
namespace vm {

#if !defined(__CUDA_ARCH__)
// Always inlined, also into the AVX2 clones of the kernels' loops: a call keeps a loop scalar.
#define PYFAST_VM_INLINE inline __attribute__((always_inline))

PYFAST_VM_INLINE int32_t float_bits_i(float f) { return static_cast<int32_t>(float_to_bits(f)); }
PYFAST_VM_INLINE float bits_i_float(int32_t i) { return bits_to_float(static_cast<uint32_t>(i)); }

// exp(x) for x <= 0: 0 below -87 (where the float result would be subnormal), NaN for NaN.
// Cephes expf: x = n ln2 + r, |r| <= ln2/2, exp(r) by a degree-6 polynomial, 2^n from the bits.
// The underflow and NaN cases are folded in with a multiply rather than a final select: GCC keeps
// a select of the computed value as a branch once SSE4.1/AVX2 is enabled, and the loop stays scalar.
PYFAST_VM_INLINE float exp_nonpos_f(float x) {
  const bool in_range = x >= -87.0f;           // false for NaN and below -87
  const float xn = in_range ? x : -87.0f;      // finite: a defined float -> int conversion
  const float xc = x < -87.0f ? -87.0f : x;    // keeps NaN, so the polynomial turns NaN
  // Round to nearest by truncating x*log2(e) - 0.5 (always <= 0 here): no floor() call.
  const int32_t n = static_cast<int32_t>(xn * 1.44269504088896341f - 0.5f);
  const float fn = static_cast<float>(n);
  float r = xc - fn * 0.693359375f;
  r = r - fn * -2.12194440e-4f;
  float poly = 1.9875691500e-4f;
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  const float er = poly * r * r + r + 1.0f;
  const float scale = bits_i_float((n + 127) << 23);  // n in [-126, 0]: a normal power of two
  // Below -87: finite * 0 = 0. NaN: NaN * 0 = NaN.
  return er * scale * (in_range ? 1.0f : 0.0f);
}

// 2 atanh(s) = log((1+s)/(1-s)) for |s| <= 1/3, by its odd series (error below 2e-9 relative).
PYFAST_VM_INLINE float two_atanh(float s) {
  const float z = s * s;
  float poly = 1.0f / 15.0f;
  poly = poly * z + 1.0f / 13.0f;
  poly = poly * z + 1.0f / 11.0f;
  poly = poly * z + 1.0f / 9.0f;
  poly = poly * z + 1.0f / 7.0f;
  poly = poly * z + 1.0f / 5.0f;
  poly = poly * z + 1.0f / 3.0f;
  poly = poly * z + 1.0f;
  return 2.0f * s * poly;
}

// log1p(e) for e in [0, 1] (the softplus tail log1p(exp(-|x|))): with s = e / (2 + e),
// log1p(e) = 2 atanh(s) and s <= 1/3. No cancellation, so tiny e keeps full relative accuracy.
PYFAST_VM_INLINE float log1p_unit_f(float e) { return two_atanh(e / (2.0f + e)); }

// log(w) for w > 0 finite (subnormals included). Callers select away w <= 0.
PYFAST_VM_INLINE float log_pos_f(float w) {
  const bool sub = w < 1.17549435e-38f;
  const float ws = sub ? w * 8388608.0f : w;  // * 2^23
  const int32_t bits = float_bits_i(ws);
  int32_t exponent = ((bits >> 23) & 0xFF) - 127 - (sub ? 23 : 0);
  float m = bits_i_float((bits & 0x007FFFFF) | 0x3F800000);  // [1, 2)
  const bool high = m > 1.41421356f;
  m = high ? 0.5f * m : m;  // [0.707, 1.414]: |s| below 0.18
  exponent += high ? 1 : 0;
  const float f = m - 1.0f;
  return static_cast<float>(exponent) * 0.693147180559945309f + two_atanh(f / (2.0f + f));
}
#endif

// Dispatch by type and by compilation target.
PYFAST_HD float exp_nonpos(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return exp_nonpos_f(x);
#endif
}
PYFAST_HD double exp_nonpos(double x) {
#if defined(__CUDA_ARCH__)
  return ::exp(x);
#else
  return std::exp(x);
#endif
}
PYFAST_HD float log1p_unit(float e) {
#if defined(__CUDA_ARCH__)
  return log1pf(e);
#else
  return log1p_unit_f(e);
#endif
}
PYFAST_HD double log1p_unit(double e) {
#if defined(__CUDA_ARCH__)
  return ::log1p(e);
#else
  return std::log1p(e);
#endif
}
PYFAST_HD float log_pos(float w) {
#if defined(__CUDA_ARCH__)
  return logf(w);
#else
  return log_pos_f(w);
#endif
}
PYFAST_HD double log_pos(double w) {
#if defined(__CUDA_ARCH__)
  return ::log(w);
#else
  return std::log(w);
#endif
}

}  // namespace vm
}  // namespace pyfast
