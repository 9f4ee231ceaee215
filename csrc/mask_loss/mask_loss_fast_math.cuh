// Fast per-element math of the mask loss for 16-bit logits (float16 / bfloat16), CUDA only.
//
// A 16-bit logit carries 8-11 significant bits, but the accurate expf, log1pf and IEEE division
// of mask_loss_math.h cost several times more issue slots per element than loading it: with them
// the forward is instruction-bound. Here each element costs one exp2 and one reciprocal on the
// special-function unit and a short polynomial for the softplus tail; the formulas are those of
// mask_loss_math.h (sigmoid and 1 - sigmoid from e = exp(-|x|) without cancellation, NaN in gives
// NaN out), only the elementary functions differ.
//
// Error bound, per element, float32 arithmetic, against exact math on the same 16-bit logit:
//   e = exp(-|x|)            relative <= 2^-21 + |x| 2^-24   (ex2.approx after one rounded multiply;
//                                                           0 where exp(-|x|) < 2^-126)
//   p = sigmoid(x), 1 - p    relative <= 2^-20 + |x| 2^-24   (approximate reciprocal of 1 + e)
//   log1p(e), e in [0, 1]    relative <= 2.5e-7              (degree-9 polynomial in e)
// so the cross entropy is within 2e-7 absolute (plus its float32 rounding) and every term that
// depends on p within 1e-6 relative: a one-element mask's loss (bce + dice) is within
// 2e-6 + 1e-6 |loss| of the float64 reference for binary targets at every finite logit (soft
// targets add the float32 rounding of x * t, 2^-24 |x t|, as in the accurate path), and a mean over
// a mask adds only float32 accumulation error, the same as the accurate path's.
// tests/ops/test_cuda_mask_loss.py checks this bound on every finite 16-bit logit.
//
// The focal term keeps the accurate forms: (1 - p_t)^gamma for a general gamma needs log and exp of
// values near 0 where the approximate forms flush subnormals, and gamma == 2 needs neither.
//
// What is 2-wide: the 16-bit <-> float32 conversions (one instruction per pair on sm_80+). The
// transcendental math stays in float32: half2 exp/log carry ~11 bits, far from the bound above.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "common/types.h"
#include "mask_loss/mask_loss_math.h"

namespace pyfast {
namespace mask_fast {

// log1p(e) for e in [0, 1] as e * q(e): a least-squares fit of log1p(e)/e over [0, 1] with
// q(0) = 1, so tiny e keeps full relative accuracy. Measured in float32 Horner evaluation over
// 200,001 points of [0, 1]: relative error 1.85e-7 at most.
__device__ __forceinline__ float log1p_unit(float e) {
  float q = -0.0032140363473445177f;
  q = fmaf(q, e, 0.019649166613817215f);
  q = fmaf(q, e, -0.056435029953718185f);
  q = fmaf(q, e, 0.10533228516578674f);
  q = fmaf(q, e, -0.1525145173072815f);
  q = fmaf(q, e, 0.19651491940021515f);
  q = fmaf(q, e, -0.24947808682918549f);
  q = fmaf(q, e, 0.3332909941673279f);
  q = fmaf(q, e, -0.4999985098838806f);
  q = fmaf(q, e, 1.0f);
  return e * q;
}

// mask::sigmoid_parts with __expf (ex2.approx) and an approximate reciprocal (1 + e is in [1, 2],
// well inside __fdividef's range). NaN gives NaN in every field; +-inf gives e = 0 and p in {0, 1}.
__device__ __forceinline__ mask::Sigmoid<float> sigmoid_parts(float x) {
  const float a = fabsf(x);
  const float e = __expf(-a);
  const float r = __fdividef(1.0f, 1.0f + e);
  const float er = e * r;
  const bool pos = x >= 0.0f;
  return {e, pos ? r : er, pos ? er : r};
}

__device__ __forceinline__ float cross_entropy(float x, float t, float e) {
  return (x > 0.0f ? x : 0.0f) - x * t + log1p_unit(e);  // NaN x: NaN from x * t
}

// The loss terms of mask::MaskLoss<FOCAL, float> with the fast sigmoid and softplus tail.
template <int FOCAL> struct FastLoss {
  mask::MaskLoss<FOCAL, float> terms;  // the focal factor and the class weights

  __device__ __forceinline__ void forward(float x, float t, float* out) const {
    const mask::Sigmoid<float> s = sigmoid_parts(x);
    const float ce = cross_entropy(x, t, s.e);
    out[mask::kSumCE] = ce;
    out[mask::kSumPT] = s.p * t;
    out[mask::kSumP] = s.p;
    out[mask::kSumT] = t;
    out[mask::kSumBadTargets] = mask::bad_target(t);
    if (FOCAL != mask::kNoFocal) {
      float factor, dfactor;
      terms.focal_factor(s, t, factor, dfactor);
      out[mask::kSumFocal] = factor * (terms.alpha0 + terms.alpha_slope * t) * ce;
    } else {
      out[mask::kSumFocal] = 0.0f;
    }
  }

  __device__ __forceinline__ float grad(const mask::RowCoef<float>& c, float x, float t) const {
    const mask::Sigmoid<float> s = sigmoid_parts(x);
    const float dce = s.p - t;
    float d = c.cb * dce + s.p * s.q * (c.cd1 - c.cd2 * t);
    if (FOCAL != mask::kNoFocal) {
      float factor, dfactor;
      terms.focal_factor(s, t, factor, dfactor);
      const float ce = cross_entropy(x, t, s.e);
      d += c.cf * (terms.alpha0 + terms.alpha_slope * t) * (dfactor * ce + factor * dce);
    }
    return d;
  }
};

// The accurate terms of mask_loss_math.h behind the same interface (float32 and float64 logits).
template <int FOCAL, class A> struct AccurateLoss {
  mask::MaskLoss<FOCAL, A> terms;
  __device__ __forceinline__ void forward(A x, A t, A* out) const { terms.forward(x, t, out); }
  __device__ __forceinline__ A grad(const mask::RowCoef<A>& c, A x, A t) const {
    return mask::element_grad(terms, c, x, t);
  }
};

template <class L> struct FocalOf;
template <int FOCAL, class A> struct FocalOf<mask::MaskLoss<FOCAL, A>> {
  static constexpr int value = FOCAL;
};

template <class T> constexpr bool is_16bit() {
  return std::is_same<T, Half>::value || std::is_same<T, BFloat16>::value;
}

// Calls fn(loss) with FastLoss for 16-bit logits and AccurateLoss otherwise, the focal mode a
// compile-time constant.
template <class T, class A, class Fn> void dispatch_loss(const MaskLossOptions& options, Fn&& fn) {
  mask::dispatch_focal<A>(options, [&](const auto& terms) {
    constexpr int kFocal = FocalOf<std::decay_t<decltype(terms)>>::value;
    if constexpr (is_16bit<T>()) {
      fn(FastLoss<kFocal>{terms});
    } else {
      fn(AccurateLoss<kFocal, A>{terms});
    }
  });
}

// ---- 2-wide conversions of VEC (even) 16-bit values ----

template <class A, class T, int VEC> __device__ __forceinline__ void to_acc_n(const T* v, A* out) {
  if constexpr (std::is_same<T, Half>::value && VEC % 2 == 0) {
#pragma unroll
    for (int j = 0; j < VEC; j += 2) {
      const float2 f = __half22float2(__halves2half2(__ushort_as_half(v[j].bits), __ushort_as_half(v[j + 1].bits)));
      out[j] = f.x;
      out[j + 1] = f.y;
    }
  } else if constexpr (std::is_same<T, BFloat16>::value && VEC % 2 == 0) {
#pragma unroll
    for (int j = 0; j < VEC; j += 2) {
      const float2 f =
          __bfloat1622float2(__halves2bfloat162(__ushort_as_bfloat16(v[j].bits), __ushort_as_bfloat16(v[j + 1].bits)));
      out[j] = f.x;
      out[j + 1] = f.y;
    }
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = to_acc<A>(v[j]);
  }
}

// Round-to-nearest-even, two values per instruction for 16-bit storage (NaN stays NaN; its
// payload is the hardware's canonical one).
template <class T, class A, int VEC> __device__ __forceinline__ void from_acc_n(const A* in, T* out) {
  if constexpr (std::is_same<T, Half>::value && VEC % 2 == 0) {
#pragma unroll
    for (int j = 0; j < VEC; j += 2) {
      const __half2 h = __floats2half2_rn(in[j], in[j + 1]);
      out[j].bits = __half_as_ushort(__low2half(h));
      out[j + 1].bits = __half_as_ushort(__high2half(h));
    }
  } else if constexpr (std::is_same<T, BFloat16>::value && VEC % 2 == 0) {
#pragma unroll
    for (int j = 0; j < VEC; j += 2) {
      const __nv_bfloat162 h = __floats2bfloat162_rn(in[j], in[j + 1]);
      out[j].bits = __bfloat16_as_ushort(__low2bfloat16(h));
      out[j + 1].bits = __bfloat16_as_ushort(__high2bfloat16(h));
    }
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = from_acc<T>(in[j]);
  }
}

}  // namespace mask_fast
}  // namespace pyfast
