// Per-element and per-mask math of the fused mask loss, shared by the CPU and CUDA kernels.
//
// The contract is pyfast.ops.reference.mask_loss_reference. Everything per element comes from
// one e = exp(-|x|): sigmoid p and 1 - p (each without cancellation) and the softplus tail
// log1p(e). The forward keeps five sums per mask; the backward is the loss's derivative written
// out from those sums, recomputing the per-element terms from the inputs.
#pragma once

#include <stdexcept>
#include <string>
#include <type_traits>

#include "common/types.h"
#include "common/vecmath.h"
#include "mask_loss/mask_loss.h"

namespace pyfast {
namespace mask {

// bool/uint8 masks are binary: any non-zero byte is foreground.
template <class A, class TT> PYFAST_HD A load_target(TT v) { return to_acc<A>(v); }
template <> PYFAST_HD float load_target<float, uint8_t>(uint8_t v) { return v != 0 ? 1.0f : 0.0f; }
template <> PYFAST_HD double load_target<double, uint8_t>(uint8_t v) { return v != 0 ? 1.0 : 0.0; }

template <class A> struct Sigmoid {
  A e;  // exp(-|x|)
  A p;  // sigmoid(x)
  A q;  // 1 - sigmoid(x) = sigmoid(-x)
};

// NaN in gives NaN in every field (the comparisons below are false for NaN and pick e * r).
template <class A> PYFAST_HD Sigmoid<A> sigmoid_parts(A x) {
  const A a = x < A(0) ? -x : x;
  const A e = vm::exp_nonpos(-a);
  const A r = A(1) / (A(1) + e);
  const A er = e * r;
  const bool pos = x >= A(0);
  return {e, pos ? r : er, pos ? er : r};
}

// ce = max(x, 0) - x t + log1p(exp(-|x|)): finite for any finite x, NaN for NaN.
template <class A> PYFAST_HD A cross_entropy(A x, A t, A e) { return (x > A(0) ? x : A(0)) - x * t + vm::log1p_unit(e); }

// 1 for a target outside [0, 1] (only float targets can be), 0 otherwise (NaN included: a NaN
// target already makes the loss NaN).
template <class A> PYFAST_HD A bad_target(A t) { return A(t < A(0)) + A(t > A(1)); }

template <int FOCAL, class A> struct MaskLoss {
  A gamma;
  A alpha0, alpha_slope;  // alpha_t = alpha0 + alpha_slope * t

  // (1 - p_t)^gamma and its derivative in x, where 1 - p_t = p (1 - t) + q t and
  // d(1 - p_t)/dx = p q (1 - 2t). For gamma != 2 the derivative is written as
  // gamma * w^gamma * (dw/w): |dw/w| <= 2, so it stays finite as w -> 0 for any gamma >= 0.
  PYFAST_HD void focal_factor(const Sigmoid<A>& s, A t, A& factor, A& dfactor) const {
    const A w = s.p * (A(1) - t) + s.q * t;
    const A dw = s.p * s.q * (A(1) - A(2) * t);
    if (FOCAL == kFocalGamma2) {
      factor = w * w;
      dfactor = A(2) * w * dw;
    } else {
      const bool pos = w > A(0);
      const A lw = vm::log_pos(pos ? w : A(1));
      const A arg = gamma * lw;
      const A pw = vm::exp_nonpos(arg < A(0) ? arg : A(0));  // w <= 1 up to rounding
      factor = pos ? pw : (gamma == A(0) ? A(1) : A(0));
      factor = w != w ? w : factor;  // keep NaN
      dfactor = pos ? gamma * pw * dw / (pos ? w : A(1)) : A(0);
    }
  }

  // Per-element contributions to the forward sums.
  PYFAST_HD void forward(A x, A t, A* out) const {
    const Sigmoid<A> s = sigmoid_parts(x);
    const A ce = cross_entropy(x, t, s.e);
    out[kSumCE] = ce;
    out[kSumPT] = s.p * t;
    out[kSumP] = s.p;
    out[kSumT] = t;
    out[kSumBadTargets] = bad_target(t);
    if (FOCAL != kNoFocal) {
      A factor, dfactor;
      focal_factor(s, t, factor, dfactor);
      out[kSumFocal] = factor * (alpha0 + alpha_slope * t) * ce;
    } else {
      out[kSumFocal] = A(0);
    }
  }
};

// Per-mask loss and backward coefficients from the forward sums.
template <class A> struct RowMath {
  A bce_weight, dice_weight, focal_weight, smooth, inv_m;

  // loss = bce_weight * mean ce + dice_weight * (1 - (2 S_pt + s) / (S_p + S_t + s)) + focal_weight * mean focal,
  // NaN for a mask with float targets outside [0, 1].
  template <class S> PYFAST_HD S loss(const S* sums) const {
    const S num = S(2) * sums[kSumPT] + S(smooth);
    const S den = sums[kSumP] + sums[kSumT] + S(smooth);
    const S poison = sums[kSumBadTargets] > S(0) ? S(NAN) : S(0);
    return S(bce_weight) * sums[kSumCE] * S(inv_m) + S(dice_weight) * (S(1) - num / den) +
           S(focal_weight) * sums[kSumFocal] * S(inv_m) + poison;
  }
};

// d loss / d x_j = cb (p - t) + p q (cd1 - cd2 t) + cf * d focal_j / d x_j, already times the
// incoming gradient g. The dice part: d(1 - N/D)/dp = N/D^2 - 2t/D.
template <class A> struct RowCoef {
  A cb, cd1, cd2, cf;
};

template <class A> PYFAST_HD RowCoef<A> row_coef(const RowMath<A>& rm, const A* sums, A g) {
  const A num = A(2) * sums[kSumPT] + rm.smooth;
  const A den = sums[kSumP] + sums[kSumT] + rm.smooth;
  const A gd = g * rm.dice_weight / den;
  return {g * rm.bce_weight * rm.inv_m, gd * num / den, gd * A(2), g * rm.focal_weight * rm.inv_m};
}

template <int FOCAL, class A>
PYFAST_HD A element_grad(const MaskLoss<FOCAL, A>& ml, const RowCoef<A>& c, A x, A t) {
  const Sigmoid<A> s = sigmoid_parts(x);
  const A dce = s.p - t;
  A d = c.cb * dce + s.p * s.q * (c.cd1 - c.cd2 * t);
  if (FOCAL != kNoFocal) {
    A factor, dfactor;
    ml.focal_factor(s, t, factor, dfactor);
    const A ce = cross_entropy(x, t, s.e);
    d += c.cf * (ml.alpha0 + ml.alpha_slope * t) * (dfactor * ce + factor * dce);
  }
  return d;
}

// mask_iou per element: fuzzy intersection / union (min / max), exact for binary targets.
template <class A> PYFAST_HD void iou_element(A x, A t, A threshold, A* out) {
  const A b = x > threshold ? A(1) : A(0);
  const A bt = b * t;
  out[kIoUInter] = bt;
  out[kIoUUnion] = b + t - bt;
  out[kIoUNaN] = x != x ? A(1) : A(0);
  out[kIoUBadTargets] = bad_target(t);
}

template <class S> PYFAST_HD S iou_from_sums(const S* sums) {
  const S uni = sums[kIoUUnion] > S(1) ? sums[kIoUUnion] : S(1);
  const S iou = sums[kIoUInter] / uni;
  return sums[kIoUNaN] > S(0) || sums[kIoUBadTargets] > S(0) ? S(NAN) : iou;
}

// Calls fn(T{}, TT{}): T the logits' storage type, TT the targets' (uint8_t, T, or float for
// half/bfloat16 logits with float32 targets).
template <class Fn> void dispatch_types(DType dtype, DType target_dtype, Fn&& fn) {
  auto with_target = [&](auto logit_tag) {
    using T = decltype(logit_tag);
    if (target_dtype == DType::UInt8) return fn(T{}, uint8_t{});
    if (target_dtype == dtype) return fn(T{}, T{});
    if (target_dtype == DType::Float32 && (std::is_same<T, Half>::value || std::is_same<T, BFloat16>::value)) {
      return fn(T{}, float{});
    }
    throw std::invalid_argument("pyfast: unsupported mask target dtype code " +
                                std::to_string(static_cast<int>(target_dtype)) + " for logits dtype code " +
                                std::to_string(static_cast<int>(dtype)));
  };
  switch (dtype) {
    case DType::Float32: return with_target(float{});
    case DType::Float64: return with_target(double{});
    case DType::Float16: return with_target(Half{});
    case DType::BFloat16: return with_target(BFloat16{});
    case DType::UInt8: break;
  }
  throw std::invalid_argument("pyfast: unsupported logits dtype code " + std::to_string(static_cast<int>(dtype)));
}

// Calls fn(MaskLoss<FOCAL, A>{...}) with the focal mode as a compile-time constant.
template <class A, class Fn> void dispatch_focal(const MaskLossOptions& options, Fn&& fn) {
  const A gamma = A(options.gamma), alpha = A(options.alpha);
  // alpha < 0 disables the class weighting: alpha_t = 1.
  const A alpha0 = alpha < A(0) ? A(1) : A(1) - alpha;
  const A slope = alpha < A(0) ? A(0) : A(2) * alpha - A(1);
  switch (focal_mode(options)) {
    case kNoFocal: return fn(MaskLoss<kNoFocal, A>{gamma, alpha0, slope});
    case kFocalGamma2: return fn(MaskLoss<kFocalGamma2, A>{gamma, alpha0, slope});
    default: return fn(MaskLoss<kFocalGeneral, A>{gamma, alpha0, slope});
  }
}

// The per-mask math's constants from the options.
template <class A> RowMath<A> row_math(const MaskLossOptions& options, int64_t m) {
  return {A(options.bce_weight), A(options.dice_weight), A(options.focal_weight), A(options.smooth),
          A(1.0 / static_cast<double>(m > 1 ? m : 1))};
}

}  // namespace mask
}  // namespace pyfast
