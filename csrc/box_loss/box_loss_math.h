// Per-box math of the fused box loss, shared by the CPU and CUDA kernels.
//
// The contract is pyfast.ops.reference.box_loss_reference; the gradients below are that
// function's autograd written out by hand, including torch's tie conventions (clamp(min=0)
// passes the gradient at 0, minimum/maximum split it in half on ties), so degenerate and
// identical boxes get the same gradient as the reference.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "box_loss/box_loss.h"
#include "common/types.h"

namespace pyfast {
namespace box {

template <class A> PYFAST_HD A relu(A x) { return x > A(0) ? x : A(0); }
// Comparisons turned into 0/1 arithmetic rather than nested branches keep the CPU loops vectorizable.
template <class A> PYFAST_HD A relu_grad(A x) { return A(x >= A(0)); }
template <class A> PYFAST_HD A min2(A a, A b) { return a < b ? a : b; }
template <class A> PYFAST_HD A max2(A a, A b) { return a > b ? a : b; }
// The share of g that reaches a through max(a, b): all of it, none, or half on a tie (torch's
// convention). Selects of values computed either way, so the CPU loops still vectorize.
template <class A> PYFAST_HD A max_share(A a, A b, A g) { return a > b ? g : (a < b ? A(0) : A(0.5) * g); }
// Adds to ga and gb the gradients of a pair (a, b) of which the larger receives g_hi and the
// smaller g_lo (both halves on a tie). Every min and max over the same two coordinates is one such
// pair, so one comparison routes them all.
template <class A> PYFAST_HD void route_by_order(A a, A b, A g_hi, A g_lo, A& ga, A& gb) {
  const A half = A(0.5) * (g_hi + g_lo);
  ga += a > b ? g_hi : (a < b ? g_lo : half);
  gb += a > b ? g_lo : (a < b ? g_hi : half);
}
template <class A> PYFAST_HD A sign(A x) { return A(x > A(0)) - A(x < A(0)); }

// atan of a non-negative argument (an aspect ratio). On the CPU in float, a branch-free
// Cephes-style polynomial (max error ~2 ulp) that vectorizes, where a call to atanf would not.
template <class A> PYFAST_HD A atan_nonneg(A x) {
#if defined(__CUDA_ARCH__)
  return atan(x);
#else
  return std::atan(x);
#endif
}
#if !defined(__CUDA_ARCH__)
template <> PYFAST_HD float atan_nonneg<float>(float x) {
  const bool large = x > 2.414213562373095f;   // tan(3pi/8)
  const bool medium = x > 0.4142135623730950f;  // tan(pi/8)
  const float offset = large ? 1.5707963267948966f : (medium ? 0.7853981633974483f : 0.0f);
  // One division for the three ranges: -1/x, (x-1)/(x+1) or x/1.
  const float r = (large ? -1.0f : (medium ? x - 1.0f : x)) / (large ? x : (medium ? x + 1.0f : 1.0f));
  const float z = r * r;
  const float poly = ((8.05374449538e-2f * z - 1.38776856032e-1f) * z + 1.99777106478e-1f) * z - 3.33329491539e-1f;
  return offset + (poly * z * r + r);
}
#endif

// Extent of the enclosing box along one axis: the hull of all four coordinates. For valid boxes
// this is max(a2, b2) - min(a1, b1), the usual enclosing box; for inverted boxes it stays >= the
// centre distance, so the GIoU/DIoU penalties stay within [0, 1] for any finite input.
template <class A> PYFAST_HD A hull_extent(A a1, A a2, A b1, A b2) {
  return max2(max2(a2, b2), max2(a1, b1)) - min2(min2(a1, b1), min2(a2, b2));
}
// Accumulates the gradients of one axis's intersection extent min(a2, b2) - max(a1, b1) (scale g_i)
// and, unless IoU, of its hull_extent (scale g_c) into the pair's coordinates. Written per pair of
// compared coordinates: (a1, b1) meet in max(a1, b1) (intersection and hull) and min(a1, b1) (hull),
// (a2, b2) in min(a2, b2) (intersection and hull) and max(a2, b2) (hull).
template <int MODE, class A>
PYFAST_HD void axis_backward(A a1, A a2, A b1, A b2, A g_i, A g_c, A& ga1, A& ga2, A& gb1, A& gb2) {
  if (MODE == kIoU) {
    route_by_order(a1, b1, -g_i, A(0), ga1, gb1);
    route_by_order(a2, b2, A(0), g_i, ga2, gb2);
    return;
  }
  const A hi_outer = max2(a2, b2), hi_inner = max2(a1, b1);
  const A lo_outer = min2(a1, b1), lo_inner = min2(a2, b2);
  // The hull extent is max(hi_outer, hi_inner) - min(lo_outer, lo_inner).
  // The two shares of a split add up to g_c exactly (g_c, 0 or halves), so one comparison each.
  const A g_hi_outer = max_share(hi_outer, hi_inner, g_c), g_hi_inner = g_c - g_hi_outer;
  const A g_lo_outer = -max_share(lo_inner, lo_outer, g_c), g_lo_inner = -g_c - g_lo_outer;
  route_by_order(a1, b1, g_hi_inner - g_i, g_lo_outer, ga1, gb1);
  route_by_order(a2, b2, g_hi_outer, g_i + g_lo_inner, ga2, gb2);
}

constexpr double kFourOverPiSquared = 0.40528473456935108577551785283891;  // 4 / pi^2
// CIoU's aspect-ratio angles atan(w / (h + eps)) pass their full gradient only for boxes whose
// diagonal |(w, h + eps)| is at least this fraction of the enclosing box's diagonal; see
// variant_backward. pyfast.ops.reference.BOX_ASPECT_FLOOR is the same number.
constexpr double kAspectFloor = 0.01;

// Zero for finite coordinates, NaN when any is NaN or infinite: added to the results so that bad
// input shows up as NaN instead of being absorbed by a max() or a clamp.
template <class A> PYFAST_HD A nonfinite_poison(const A* p, const A* t) {
  A s = A(0);
  for (int k = 0; k < 4; ++k) s += (p[k] - p[k]) + (t[k] - t[k]);
  return s;
}

// Large boxes. The IoU math multiplies extents (areas), and its gradient squares those products, so
// finite boxes with coordinates beyond ~2^31 (float) overflow to inf and NaN. Such a pair is scaled
// by a power of two s (exact: only the exponent changes) that brings its largest |coordinate| to
// about 2^20 (float; 2^200 for double, whose limit is ~2^255) before the math: the IoU variants
// are scale-invariant (eps aside, which is negligible at these scales), the L1 term and the
// gradients are scaled back by 1/s and s. Pairs below the threshold get s = 1, which leaves every
// result bit for bit as without the scaling. Written with integer ops on the exponent bits so that
// the CPU loops still vectorize; the CPU kernels skip it for blocks where no coordinate reaches
// the threshold (needs_scale), the CUDA kernels always apply it (it costs them nothing).
struct PairScale {
  static constexpr int32_t kMaxExpFloat = 30, kToExpFloat = 20;
  static constexpr int64_t kMaxExpDouble = 250, kToExpDouble = 200;
  template <class A> struct Factors {
    A s, inv_s;
  };
  PYFAST_HD static int32_t exponent(float x) { return static_cast<int32_t>((float_to_bits(x) >> 23) & 0xFFu) - 127; }
  PYFAST_HD static int64_t exponent(double x) {
    return static_cast<int64_t>((double_to_bits(x) >> 52) & 0x7FFu) - 1023;
  }
  // Whether a coordinate x (inf and NaN included) makes its pair scaled.
  PYFAST_HD static bool needs_scale(float x) { return exponent(x) >= kMaxExpFloat; }
  PYFAST_HD static bool needs_scale(double x) { return exponent(x) >= kMaxExpDouble; }
  PYFAST_HD static Factors<float> of(float max_abs) {
    const int32_t e = exponent(max_abs);
    const int32_t shift = e >= kMaxExpFloat ? kToExpFloat - e : 0;  // inf/NaN: e = 128, still a normal factor
    return {bits_to_float(static_cast<uint32_t>(127 + shift) << 23),
            bits_to_float(static_cast<uint32_t>(127 - shift) << 23)};
  }
  PYFAST_HD static Factors<double> of(double max_abs) {
    const int64_t e = exponent(max_abs);
    const int64_t shift = e >= kMaxExpDouble ? kToExpDouble - e : 0;
    return {bits_to_double(static_cast<uint64_t>(1023 + shift) << 52),
            bits_to_double(static_cast<uint64_t>(1023 - shift) << 52)};
  }
};

template <class A> PYFAST_HD A abs_value(A x) { return x < A(0) ? -x : x; }

// Copies the pair into p, t, scaled by PairScale when SCALED, and returns the factors.
template <bool SCALED, class A>
PYFAST_HD PairScale::Factors<A> scale_pair(const A* p_raw, const A* t_raw, A* p, A* t) {
  PairScale::Factors<A> f{A(1), A(1)};
  if (SCALED) {
    A m = abs_value(p_raw[0]);
    for (int k = 1; k < 4; ++k) m = max2(m, abs_value(p_raw[k]));
    for (int k = 0; k < 4; ++k) m = max2(m, abs_value(t_raw[k]));
    f = PairScale::of(m);
  }
  for (int k = 0; k < 4; ++k) {
    p[k] = p_raw[k] * f.s;
    t[k] = t_raw[k] * f.s;
  }
  return f;
}

// In-place cxcywh -> xyxy, and the matching gradient map back to cxcywh.
template <class A> PYFAST_HD void cxcywh_to_xyxy(A* b) {
  const A cx = b[0], cy = b[1], hw = A(0.5) * b[2], hh = A(0.5) * b[3];
  b[0] = cx - hw;
  b[1] = cy - hh;
  b[2] = cx + hw;
  b[3] = cy + hh;
}
template <class A> PYFAST_HD void xyxy_grad_to_cxcywh(A* g) {
  const A g0 = g[0], g1 = g[1], g2 = g[2], g3 = g[3];
  g[0] = g0 + g2;
  g[1] = g1 + g3;
  g[2] = A(0.5) * (g2 - g0);
  g[3] = A(0.5) * (g3 - g1);
}

// The IoU variant of two xyxy boxes.
template <int MODE, class A> PYFAST_HD A variant_forward(const A* p, const A* t, A eps) {
  const A wp = relu(p[2] - p[0]), hp = relu(p[3] - p[1]);
  const A wg = relu(t[2] - t[0]), hg = relu(t[3] - t[1]);
  const A iw = relu(min2(p[2], t[2]) - max2(p[0], t[0]));
  const A ih = relu(min2(p[3], t[3]) - max2(p[1], t[1]));
  const A inter = iw * ih;
  const A uni = wp * hp + wg * hg - inter;
  const A iou = inter / (uni + eps);
  if (MODE == kIoU) return iou;
  const A cw = hull_extent(p[0], p[2], t[0], t[2]);
  const A ch = hull_extent(p[1], p[3], t[1], t[3]);
  if (MODE == kGIoU) {
    const A area_c = cw * ch;
    return iou - (area_c - uni) / (area_c + eps);
  }
  const A dx = A(0.5) * (p[0] + p[2] - t[0] - t[2]);
  const A dy = A(0.5) * (p[1] + p[3] - t[1] - t[3]);
  const A diou = iou - (dx * dx + dy * dy) / (cw * cw + ch * ch + eps);
  if (MODE == kDIoU) return diou;
  const A diff = atan_nonneg(wg / (hg + eps)) - atan_nonneg(wp / (hp + eps));
  const A v = A(kFourOverPiSquared) * diff * diff;
  const A alpha = v / (A(1) - iou + v + eps);  // a constant for the gradient
  return diou - alpha * v;
}

// Accumulates g * d(variant)/d(box) into gp (pred) and gt (target), both xyxy. Each division of
// the forward whose denominator recurs is one reciprocal here: the backward is bound by the number
// of vector operations, not by memory.
template <int MODE, class A> PYFAST_HD void variant_backward(const A* p, const A* t, A eps, A g, A* gp, A* gt) {
  // Recompute the forward quantities.
  const A wp_raw = p[2] - p[0], hp_raw = p[3] - p[1];
  const A wg_raw = t[2] - t[0], hg_raw = t[3] - t[1];
  const A wp = relu(wp_raw), hp = relu(hp_raw), wg = relu(wg_raw), hg = relu(hg_raw);
  const A iw_raw = min2(p[2], t[2]) - max2(p[0], t[0]);
  const A ih_raw = min2(p[3], t[3]) - max2(p[1], t[1]);
  const A iw = relu(iw_raw), ih = relu(ih_raw);
  const A inter = iw * ih;
  const A uni = wp * hp + wg * hg - inter;
  const A U = uni + eps;
  const A inv_U = A(1) / U;
  const A iou = inter * inv_U;

  A g_uni = A(0), g_cw = A(0), g_ch = A(0), g_wp = A(0), g_hp = A(0), g_wg = A(0), g_hg = A(0);
  if (MODE != kIoU) {
    const A cw = hull_extent(p[0], p[2], t[0], t[2]);
    const A ch = hull_extent(p[1], p[3], t[1], t[3]);
    if (MODE == kGIoU) {
      // penalty = (area_c - uni) / (area_c + eps). An enclosing box of zero area (both boxes of
      // zero area, on one line): the penalty is 0 / eps = 0 and passes no gradient (it would be ~1/eps).
      const A area_c = cw * ch, live_c = A(area_c > A(0));
      const A inv_ce = A(1) / (area_c + eps);
      const A g_pen = live_c * g * inv_ce;  // d variant / d uni
      const A g_c = -g_pen * U * inv_ce;    // d variant / d area_c
      g_uni += g_pen;
      g_cw += g_c * ch;
      g_ch += g_c * cw;
    } else {
      const A dx = A(0.5) * (p[0] + p[2] - t[0] - t[2]);
      const A dy = A(0.5) * (p[1] + p[3] - t[1] - t[3]);
      const A rho2 = dx * dx + dy * dy;
      const A inv_c2 = A(1) / (cw * cw + ch * ch + eps);
      const A g_c2 = g * rho2 * inv_c2 * inv_c2;
      g_cw += g_c2 * A(2) * cw;
      g_ch += g_c2 * A(2) * ch;
      // d rho2 / d x1 = dx (the centre is (x1+x2)/2); the penalty enters with a minus sign.
      const A g_dx = -g * dx * inv_c2;
      const A g_dy = -g * dy * inv_c2;
      gp[0] += g_dx;
      gp[2] += g_dx;
      gt[0] -= g_dx;
      gt[2] -= g_dx;
      gp[1] += g_dy;
      gp[3] += g_dy;
      gt[1] -= g_dy;
      gt[3] -= g_dy;
      if (MODE == kCIoU) {
        const A hpe = hp + eps, hge = hg + eps;
        const A inv_hpe = A(1) / hpe, inv_hge = A(1) / hge;
        const A rp = wp * inv_hpe, rg = wg * inv_hge;
        const A diff = atan_nonneg(rg) - atan_nonneg(rp);
        const A v = A(kFourOverPiSquared) * diff * diff;
        const A alpha = v / (A(1) - iou + v + eps);
        const A g_diff = -g * alpha * A(2) * A(kFourOverPiSquared) * diff;
        // The angle's gradient has norm 1 / |(w, h + eps)|, ~1/eps for a point box: it is scaled
        // by min(1, |(w, h + eps)|^2 / (kAspectFloor^2 c2)), which bounds it by
        // 1 / (kAspectFloor sqrt(c2)) and leaves boxes larger than that untouched.
        const A inv_floor2 = inv_c2 * A(1.0 / (kAspectFloor * kAspectFloor));
        const A fp = min2(A(1), (wp * wp + hpe * hpe) * inv_floor2), fg = min2(A(1), (wg * wg + hge * hge) * inv_floor2);
        const A dp = fp / (A(1) + rp * rp), dg = fg / (A(1) + rg * rg);
        g_wp += -g_diff * dp * inv_hpe;
        g_hp += g_diff * dp * rp * inv_hpe;
        g_wg += g_diff * dg * inv_hge;
        g_hg += -g_diff * dg * rg * inv_hge;
      }
    }
  }
  // iou = inter / (uni + eps). A zero union (both boxes of zero area): the IoU is 0 / eps = 0 and
  // passes no gradient (it would be ~1/eps through the clamp's gradient at 0).
  const A live = A(uni > A(0));
  A g_inter = live * g * inv_U;
  g_uni -= g_inter * iou;
  // uni = wp*hp + wg*hg - inter
  g_inter -= g_uni;
  g_wp += g_uni * hp;
  g_hp += g_uni * wp;
  g_wg += g_uni * hg;
  g_hg += g_uni * wg;
  // inter = relu(iw_raw) * relu(ih_raw); the extents' min/max and the hull, per axis.
  const A g_iw = g_inter * ih * relu_grad(iw_raw);
  const A g_ih = g_inter * iw * relu_grad(ih_raw);
  axis_backward<MODE>(p[0], p[2], t[0], t[2], g_iw, g_cw, gp[0], gp[2], gt[0], gt[2]);
  axis_backward<MODE>(p[1], p[3], t[1], t[3], g_ih, g_ch, gp[1], gp[3], gt[1], gt[3]);
  // Box sizes: w = relu(x2 - x1).
  g_wp *= relu_grad(wp_raw);
  g_hp *= relu_grad(hp_raw);
  g_wg *= relu_grad(wg_raw);
  g_hg *= relu_grad(hg_raw);
  gp[2] += g_wp;
  gp[0] -= g_wp;
  gp[3] += g_hp;
  gp[1] -= g_hp;
  gt[2] += g_wg;
  gt[0] -= g_wg;
  gt[3] += g_hg;
  gt[1] -= g_hg;
}

// Loads one box (4 coordinates) from storage into accumulation precision.
template <class A, class T> PYFAST_HD void load_box(const T* src, A* dst) {
  for (int k = 0; k < 4; ++k) dst[k] = to_acc<A>(src[k]);
}

// Per-box loss and its gradient, for one box pair given in `FORMAT`.
// loss = l1_weight * mean|p - t| + iou_weight * (1 - variant)   (unweighted by the per-box weight)
// SCALED: with the PairScale step, for pairs that may hold large coordinates (scaled() below).
template <int MODE, int FORMAT, class A, bool SCALED = false> struct BoxLoss {
  A l1_weight, iou_weight, eps;

  PYFAST_HD BoxLoss<MODE, FORMAT, A, true> scaled() const { return {l1_weight, iou_weight, eps}; }

  // nonfinite_poison, which only the scaled loss needs: a non-finite coordinate always sends its
  // pair there (PairScale::needs_scale), so the unscaled loss never sees one. Adding zero instead
  // keeps the two losses' results bit for bit alike on ordinary pairs (-0 + 0 is +0 in both).
  PYFAST_HD static A poison(const A* p_raw, const A* t_raw) {
    return SCALED ? nonfinite_poison(p_raw, t_raw) : A(0);
  }

  // The pair scaled (PairScale) and in xyxy, ready for the IoU math.
  PYFAST_HD PairScale::Factors<A> prepare(const A* p_raw, const A* t_raw, A* p, A* t) const {
    const PairScale::Factors<A> f = scale_pair<SCALED>(p_raw, t_raw, p, t);
    if (FORMAT == kCXCYWH) {
      cxcywh_to_xyxy(p);
      cxcywh_to_xyxy(t);
    }
    return f;
  }

  PYFAST_HD A forward(const A* p_raw, const A* t_raw) const {
    A p[4], t[4];
    A l1 = A(0);
    const PairScale::Factors<A> f = scale_pair<SCALED>(p_raw, t_raw, p, t);
    for (int k = 0; k < 4; ++k) l1 += abs_value(p[k] - t[k]);
    if (FORMAT == kCXCYWH) {
      cxcywh_to_xyxy(p);
      cxcywh_to_xyxy(t);
    }
    const A var = variant_forward<MODE>(p, t, eps);
    return l1_weight * (A(0.25) * l1 * f.inv_s) + iou_weight * (A(1) - var) + poison(p_raw, t_raw);
  }

  // With per-coordinate weights w[4]: sum_k w_k |p_k - t_k| / 4 for the L1 term, mean(w) for the IoU term.
  PYFAST_HD A forward_weighted(const A* p_raw, const A* t_raw, const A* w) const {
    A p[4], t[4];
    A l1 = A(0);
    const PairScale::Factors<A> f = scale_pair<SCALED>(p_raw, t_raw, p, t);
    for (int k = 0; k < 4; ++k) l1 += w[k] * abs_value(p[k] - t[k]);
    if (FORMAT == kCXCYWH) {
      cxcywh_to_xyxy(p);
      cxcywh_to_xyxy(t);
    }
    const A w_mean = A(0.25) * (w[0] + w[1] + w[2] + w[3]);
    const A var = variant_forward<MODE>(p, t, eps);
    return l1_weight * (A(0.25) * l1 * f.inv_s) + iou_weight * w_mean * (A(1) - var) +
           poison(p_raw, t_raw);
  }

  PYFAST_HD A variant(const A* p_raw, const A* t_raw) const {
    A p[4], t[4];
    prepare(p_raw, t_raw, p, t);
    return variant_forward<MODE>(p, t, eps) + poison(p_raw, t_raw);
  }

  // gp, gt receive d loss / d box (overwritten), where the L1 term of coordinate k has the
  // gradient scale g_l1[k] and the IoU term g_iou.
  PYFAST_HD void backward_terms(const A* p_raw, const A* t_raw, A g_iou, const A* g_l1, A* gp, A* gt) const {
    A p[4], t[4];
    const PairScale::Factors<A> f = prepare(p_raw, t_raw, p, t);
    for (int k = 0; k < 4; ++k) gp[k] = gt[k] = A(0);
    variant_backward<MODE>(p, t, eps, -g_iou * iou_weight, gp, gt);
    if (FORMAT == kCXCYWH) {
      xyxy_grad_to_cxcywh(gp);
      xyxy_grad_to_cxcywh(gt);
    }
    const A nonfinite = poison(p_raw, t_raw);
    for (int k = 0; k < 4; ++k) {
      const A s = g_l1[k] * l1_weight * A(0.25) * sign(p_raw[k] - t_raw[k]);
      // d variant(s x) / dx = s variant'(s x)
      gp[k] = gp[k] * f.s + s + nonfinite;
      gt[k] = gt[k] * f.s - s + nonfinite;
    }
  }

  // gp, gt receive g * d loss / d box (overwritten).
  PYFAST_HD void backward(const A* p_raw, const A* t_raw, A g, A* gp, A* gt) const {
    const A g_l1[4] = {g, g, g, g};
    backward_terms(p_raw, t_raw, g, g_l1, gp, gt);
  }

  // The same for the loss with per-coordinate weights w[4].
  PYFAST_HD void backward_weighted(const A* p_raw, const A* t_raw, A g, const A* w, A* gp, A* gt) const {
    const A g_l1[4] = {g * w[0], g * w[1], g * w[2], g * w[3]};
    backward_terms(p_raw, t_raw, g * (A(0.25) * (w[0] + w[1] + w[2] + w[3])), g_l1, gp, gt);
  }

  // gw receives g * d loss / d w_k of the per-coordinate-weighted loss:
  // g * (l1_weight |p_k - t_k| + iou_weight (1 - variant)) / 4.
  PYFAST_HD void weight_grad(const A* p_raw, const A* t_raw, A g, A* gw) const {
    A p[4], t[4];
    const PairScale::Factors<A> f = scale_pair<SCALED>(p_raw, t_raw, p, t);
    A d[4];
    for (int k = 0; k < 4; ++k) d[k] = abs_value(p[k] - t[k]) * f.inv_s;
    if (FORMAT == kCXCYWH) {
      cxcywh_to_xyxy(p);
      cxcywh_to_xyxy(t);
    }
    const A iou_term = iou_weight * (A(1) - variant_forward<MODE>(p, t, eps));
    const A nonfinite = poison(p_raw, t_raw);
    for (int k = 0; k < 4; ++k) gw[k] = g * (A(0.25) * (l1_weight * d[k] + iou_term)) + nonfinite;
  }
};

// Calls fn(BoxLoss<MODE, FORMAT, A>{...}) with the mode and format as compile-time constants.
template <class A, class Fn> void dispatch_box_loss(const BoxLossOptions& options, Fn&& fn) {
  const A l1_weight = A(options.l1_weight), iou_weight = A(options.iou_weight), eps = A(options.eps);
  auto with_format = [&](auto mode_tag) {
    constexpr int M = decltype(mode_tag)::value;
    if (options.box_format == kCXCYWH) {
      fn(BoxLoss<M, kCXCYWH, A>{l1_weight, iou_weight, eps});
    } else {
      fn(BoxLoss<M, kXYXY, A>{l1_weight, iou_weight, eps});
    }
  };
  switch (options.mode) {
    case kIoU: with_format(std::integral_constant<int, kIoU>{}); break;
    case kGIoU: with_format(std::integral_constant<int, kGIoU>{}); break;
    case kDIoU: with_format(std::integral_constant<int, kDIoU>{}); break;
    default: with_format(std::integral_constant<int, kCIoU>{}); break;
  }
}

}  // namespace box
}  // namespace pyfast
