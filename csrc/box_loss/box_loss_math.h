// Per-box math of the fused box loss, shared by the CPU and CUDA kernels.
//
// The contract is pyfast.ops.reference.box_loss_reference; the gradients below are that
// function's autograd written out by hand, including torch's tie conventions (clamp(min=0)
// passes the gradient at 0, minimum/maximum split it in half on ties), so degenerate and
// identical boxes get the same gradient as the reference.
#pragma once

#include <cmath>
#include <type_traits>

#include "common/types.h"

namespace pyfast {
namespace box {

// Must match pyfast/ops/box_loss.py.
enum Mode : int { kIoU = 0, kGIoU = 1, kDIoU = 2, kCIoU = 3 };
enum Format : int { kXYXY = 0, kCXCYWH = 1 };
enum Output : int { kLoss = 0, kVariant = 1 };

template <class A> PYFAST_HD A relu(A x) { return x > A(0) ? x : A(0); }
// Comparisons turned into 0/1 arithmetic rather than nested branches keep the CPU loops vectorizable.
template <class A> PYFAST_HD A relu_grad(A x) { return A(x >= A(0)); }
template <class A> PYFAST_HD A min2(A a, A b) { return a < b ? a : b; }
template <class A> PYFAST_HD A max2(A a, A b) { return a > b ? a : b; }
// d max(a,b)/da and d min(a,b)/da, half on ties.
template <class A> PYFAST_HD A max_grad_a(A a, A b) { return A(a > b) + A(0.5) * A(a == b); }
template <class A> PYFAST_HD A min_grad_a(A a, A b) { return A(a < b) + A(0.5) * A(a == b); }
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
  const float r = large ? -1.0f / x : (medium ? (x - 1.0f) / (x + 1.0f) : x);
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
template <class A>
PYFAST_HD void hull_extent_backward(A a1, A a2, A b1, A b2, A g, A& ga1, A& ga2, A& gb1, A& gb2) {
  const A hi_outer = max2(a2, b2), hi_inner = max2(a1, b1);
  const A g_hi_outer = g * max_grad_a(hi_outer, hi_inner), g_hi_inner = g * max_grad_a(hi_inner, hi_outer);
  ga2 += g_hi_outer * max_grad_a(a2, b2);
  gb2 += g_hi_outer * max_grad_a(b2, a2);
  ga1 += g_hi_inner * max_grad_a(a1, b1);
  gb1 += g_hi_inner * max_grad_a(b1, a1);
  const A lo_outer = min2(a1, b1), lo_inner = min2(a2, b2);
  const A g_lo_outer = -g * min_grad_a(lo_outer, lo_inner), g_lo_inner = -g * min_grad_a(lo_inner, lo_outer);
  ga1 += g_lo_outer * min_grad_a(a1, b1);
  gb1 += g_lo_outer * min_grad_a(b1, a1);
  ga2 += g_lo_inner * min_grad_a(a2, b2);
  gb2 += g_lo_inner * min_grad_a(b2, a2);
}

constexpr double kFourOverPiSquared = 0.40528473456935108577551785283891;  // 4 / pi^2

// Zero for finite coordinates, NaN when any is NaN or infinite: added to the results so that bad
// input shows up as NaN instead of being absorbed by a max() or a clamp.
template <class A> PYFAST_HD A nonfinite_poison(const A* p, const A* t) {
  A s = A(0);
  for (int k = 0; k < 4; ++k) s += (p[k] - p[k]) + (t[k] - t[k]);
  return s;
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

// Accumulates g * d(variant)/d(box) into gp (pred) and gt (target), both xyxy.
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
  const A iou = inter / U;

  A g_uni = A(0), g_cw = A(0), g_ch = A(0), g_wp = A(0), g_hp = A(0), g_wg = A(0), g_hg = A(0);
  if (MODE != kIoU) {
    const A cw = hull_extent(p[0], p[2], t[0], t[2]);
    const A ch = hull_extent(p[1], p[3], t[1], t[3]);
    if (MODE == kGIoU) {
      const A ce = cw * ch + eps;
      const A g_c = -g * (uni + eps) / (ce * ce);
      g_uni += g / ce;
      g_cw += g_c * ch;
      g_ch += g_c * cw;
    } else {
      const A dx = A(0.5) * (p[0] + p[2] - t[0] - t[2]);
      const A dy = A(0.5) * (p[1] + p[3] - t[1] - t[3]);
      const A rho2 = dx * dx + dy * dy;
      const A c2 = cw * cw + ch * ch + eps;
      const A g_c2 = g * rho2 / (c2 * c2);
      g_cw += g_c2 * A(2) * cw;
      g_ch += g_c2 * A(2) * ch;
      // d rho2 / d x1 = dx (the centre is (x1+x2)/2); the penalty enters with a minus sign.
      const A g_dx = -g * dx / c2;
      const A g_dy = -g * dy / c2;
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
        const A rp = wp / hpe, rg = wg / hge;
        const A diff = atan_nonneg(rg) - atan_nonneg(rp);
        const A v = A(kFourOverPiSquared) * diff * diff;
        const A alpha = v / (A(1) - iou + v + eps);
        const A g_diff = -g * alpha * A(2) * A(kFourOverPiSquared) * diff;
        const A dp = A(1) / (A(1) + rp * rp), dg = A(1) / (A(1) + rg * rg);
        g_wp += -g_diff * dp / hpe;
        g_hp += g_diff * dp * wp / (hpe * hpe);
        g_wg += g_diff * dg / hge;
        g_hg += -g_diff * dg * wg / (hge * hge);
      }
    }
  }
  // iou = inter / (uni + eps)
  A g_inter = g / U;
  g_uni += -g * inter / (U * U);
  // uni = wp*hp + wg*hg - inter
  g_inter -= g_uni;
  g_wp += g_uni * hp;
  g_hp += g_uni * wp;
  g_wg += g_uni * hg;
  g_hg += g_uni * wg;
  // inter = relu(iw_raw) * relu(ih_raw)
  const A g_iw = g_inter * ih * relu_grad(iw_raw);
  const A g_ih = g_inter * iw * relu_grad(ih_raw);
  gp[2] += g_iw * min_grad_a(p[2], t[2]);
  gt[2] += g_iw * min_grad_a(t[2], p[2]);
  gp[0] -= g_iw * max_grad_a(p[0], t[0]);
  gt[0] -= g_iw * max_grad_a(t[0], p[0]);
  gp[3] += g_ih * min_grad_a(p[3], t[3]);
  gt[3] += g_ih * min_grad_a(t[3], p[3]);
  gp[1] -= g_ih * max_grad_a(p[1], t[1]);
  gt[1] -= g_ih * max_grad_a(t[1], p[1]);
  if (MODE != kIoU) {
    hull_extent_backward(p[0], p[2], t[0], t[2], g_cw, gp[0], gp[2], gt[0], gt[2]);
    hull_extent_backward(p[1], p[3], t[1], t[3], g_ch, gp[1], gp[3], gt[1], gt[3]);
  }
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
template <int MODE, int FORMAT, class A> struct BoxLoss {
  A l1_weight, iou_weight, eps;

  PYFAST_HD A forward(const A* p_raw, const A* t_raw) const {
    A l1 = A(0);
    for (int k = 0; k < 4; ++k) {
      const A d = p_raw[k] - t_raw[k];
      l1 += d < A(0) ? -d : d;
    }
    A p[4] = {p_raw[0], p_raw[1], p_raw[2], p_raw[3]}, t[4] = {t_raw[0], t_raw[1], t_raw[2], t_raw[3]};
    if (FORMAT == kCXCYWH) {
      cxcywh_to_xyxy(p);
      cxcywh_to_xyxy(t);
    }
    const A var = variant_forward<MODE>(p, t, eps);
    return l1_weight * A(0.25) * l1 + iou_weight * (A(1) - var) + nonfinite_poison(p_raw, t_raw);
  }

  PYFAST_HD A variant(const A* p_raw, const A* t_raw) const {
    A p[4] = {p_raw[0], p_raw[1], p_raw[2], p_raw[3]}, t[4] = {t_raw[0], t_raw[1], t_raw[2], t_raw[3]};
    if (FORMAT == kCXCYWH) {
      cxcywh_to_xyxy(p);
      cxcywh_to_xyxy(t);
    }
    return variant_forward<MODE>(p, t, eps) + nonfinite_poison(p_raw, t_raw);
  }

  // gp, gt receive g * d loss / d box (overwritten).
  PYFAST_HD void backward(const A* p_raw, const A* t_raw, A g, A* gp, A* gt) const {
    A p[4] = {p_raw[0], p_raw[1], p_raw[2], p_raw[3]}, t[4] = {t_raw[0], t_raw[1], t_raw[2], t_raw[3]};
    if (FORMAT == kCXCYWH) {
      cxcywh_to_xyxy(p);
      cxcywh_to_xyxy(t);
    }
    for (int k = 0; k < 4; ++k) gp[k] = gt[k] = A(0);
    variant_backward<MODE>(p, t, eps, -g * iou_weight, gp, gt);
    if (FORMAT == kCXCYWH) {
      xyxy_grad_to_cxcywh(gp);
      xyxy_grad_to_cxcywh(gt);
    }
    const A poison = nonfinite_poison(p_raw, t_raw);
    const A gl1 = g * l1_weight * A(0.25);
    for (int k = 0; k < 4; ++k) {
      const A s = gl1 * sign(p_raw[k] - t_raw[k]);
      gp[k] += s + poison;
      gt[k] += -s + poison;
    }
  }
};

// Calls fn(BoxLoss<MODE, FORMAT, A>{...}) with the mode and format as compile-time constants.
template <class A, class Fn> void dispatch_box_loss(int mode, int format, A l1_weight, A iou_weight, A eps, Fn&& fn) {
  auto with_format = [&](auto mode_tag) {
    constexpr int M = decltype(mode_tag)::value;
    if (format == kCXCYWH) {
      fn(BoxLoss<M, kCXCYWH, A>{l1_weight, iou_weight, eps});
    } else {
      fn(BoxLoss<M, kXYXY, A>{l1_weight, iou_weight, eps});
    }
  };
  switch (mode) {
    case kIoU: with_format(std::integral_constant<int, kIoU>{}); break;
    case kGIoU: with_format(std::integral_constant<int, kGIoU>{}); break;
    case kDIoU: with_format(std::integral_constant<int, kDIoU>{}); break;
    default: with_format(std::integral_constant<int, kCIoU>{}); break;
  }
}

}  // namespace box
}  // namespace pyfast
