// AVX2 + FMA bodies of the mask loss's hot CPU case: float32 logits, binary (uint8/bool) or float32
// targets, bce + dice without the focal term. Included by mask_loss_cpu.cpp only, which picks them
// at run time when the CPU has AVX2 and FMA and otherwise runs the portable loops.
//
// Same formulas as mask_loss_math.h, eight elements per step with the accumulators held in
// registers (the portable loops go through a small buffer so that the compiler can vectorize the
// sums without reassociating them). The two divisions per element (the sigmoid's 1 / (1 + e) and
// log1p's e / (2 + e)) use the hardware reciprocal refined by one Newton step: within 2 ulp of the
// IEEE quotient, where a divide would cost more than all the other arithmetic of an element.
// The loops are bound both by the latency of each element's exp -> reciprocal -> log chain (hence
// Estrin's scheme and four independent steps per iteration) and by the number of vector
// operations, so each one is counted: exp's 2^n comes from a shifter, the sigmoid's larger half is
// 1 minus the smaller, float targets keep a range rather than a count. Results stay within a few
// ulp of the portable loops' and independent of the thread count: each piece is summed in a fixed
// lane order.
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PYFAST_MASK_AVX2 1

#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "mask_loss/mask_loss_math.h"

namespace pyfast {
namespace mask {
namespace avx2 {

#define PYFAST_AVX2_FN __attribute__((target("avx2,fma")))
#define PYFAST_AVX2_INLINE __attribute__((target("avx2,fma"), always_inline)) inline

using V = __m256;

PYFAST_AVX2_INLINE V set1(float v) { return _mm256_set1_ps(v); }

// 1 / d for d in [1, 3] (or NaN): rcp's 12 bits, one Newton step.
PYFAST_AVX2_INLINE V reciprocal(V d) {
  const V r0 = _mm256_rcp_ps(d);
  return _mm256_fmadd_ps(r0, _mm256_fnmadd_ps(d, r0, set1(1.0f)), r0);
}

// vm::exp_nonpos_f's range reduction and polynomial, eight lanes: exp(x) for x <= 0, 0 below -87,
// NaN for NaN.
PYFAST_AVX2_INLINE V exp_nonpos(V x) {
  const V lo = set1(-87.0f);
  const V xc = _mm256_max_ps(lo, x);  // max returns its second operand for NaN: keeps NaN
  // n = round(x / ln 2) by the shifter: 1.5 * 2^23 + 127 added leaves n + 127 in the low bits of
  // the sum (n in [-126, 0] here), which shifted by 23 is 2^n's exponent field. Three operations
  // where a float -> int -> float round trip takes five.
  const V shifter = set1(12583039.0f);
  const V shifted = _mm256_fmadd_ps(xc, set1(1.44269504088896341f), shifter);
  const V fn = _mm256_sub_ps(shifted, shifter);
  V r = _mm256_fnmadd_ps(fn, set1(0.693359375f), xc);
  r = _mm256_fnmadd_ps(fn, set1(-2.12194440e-4f), r);
  // The degree-5 polynomial by Estrin's scheme: three dependent steps instead of Horner's five,
  // for the same number of operations (the chain exp -> reciprocal -> log is each element's
  // latency).
  const V r2 = _mm256_mul_ps(r, r);
  const V p01 = _mm256_fmadd_ps(set1(1.6666665459e-1f), r, set1(5.0000001201e-1f));
  const V p23 = _mm256_fmadd_ps(set1(8.3334519073e-3f), r, set1(4.1665795894e-2f));
  const V p45 = _mm256_fmadd_ps(set1(1.9875691500e-4f), r, set1(1.3981999507e-3f));
  const V poly = _mm256_fmadd_ps(_mm256_fmadd_ps(p45, r2, p23), r2, p01);
  const V er = _mm256_add_ps(_mm256_fmadd_ps(poly, r2, r), set1(1.0f));
  const V scale = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(shifted), 23));
  // Below -87: 0 (an ordered compare, so NaN keeps its value).
  return _mm256_andnot_ps(_mm256_cmp_ps(x, lo, _CMP_LT_OQ), _mm256_mul_ps(er, scale));
}

// vm::log1p_unit_f: log1p(e) for e in [0, 1] as 2 atanh(e / (2 + e)).
PYFAST_AVX2_INLINE V log1p_unit(V e) {
  const V s = _mm256_mul_ps(e, reciprocal(_mm256_add_ps(e, set1(2.0f))));
  const V z = _mm256_mul_ps(s, s);
  // 2 (1 + z/3 + z^2/5 + ... + z^7/15) by Estrin's scheme (four dependent steps instead of
  // eight). The factor 2 sits in the coefficients: doubling is exact, so every step rounds as it
  // would for 2 s times the series.
  const V z2 = _mm256_mul_ps(z, z);
  const V z4 = _mm256_mul_ps(z2, z2);
  const V q0 = _mm256_fmadd_ps(set1(2.0f / 3.0f), z, set1(2.0f));
  const V q1 = _mm256_fmadd_ps(set1(2.0f / 7.0f), z, set1(2.0f / 5.0f));
  const V q2 = _mm256_fmadd_ps(set1(2.0f / 11.0f), z, set1(2.0f / 9.0f));
  const V q3 = _mm256_fmadd_ps(set1(2.0f / 15.0f), z, set1(2.0f / 13.0f));
  const V poly = _mm256_fmadd_ps(_mm256_fmadd_ps(q3, z2, q2), z4, _mm256_fmadd_ps(q1, z2, q0));
  return _mm256_mul_ps(s, poly);
}

struct Parts {
  V e;      // exp(-|x|)
  V small;  // min(p, q) = e / (1 + e), the half that keeps its relative precision
  V p, q;   // sigmoid(x), 1 - sigmoid(x)
};

// The halves from `small` and a value carrying x's sign: the larger one as 1 - small (at least
// 0.5, so it loses nothing to the subtraction), and p the larger where x >= 0. blendv selects by
// the sign bit: x = -0 gives small = 0.5, where both halves are 0.5 anyway.
PYFAST_AVX2_INLINE Parts parts_from_small(V e, V small, V sign) {
  const V large = _mm256_sub_ps(set1(1.0f), small);
  return {e, small, _mm256_blendv_ps(large, small, sign), _mm256_blendv_ps(small, large, sign)};
}

PYFAST_AVX2_INLINE Parts sigmoid_parts(V x) {
  const V e = exp_nonpos(_mm256_or_ps(x, set1(-0.0f)));  // exp(-|x|)
  return parts_from_small(e, _mm256_mul_ps(e, reciprocal(_mm256_add_ps(e, set1(1.0f)))), x);
}

// The sigmoid cache: min(p, q) carrying x's sign, written by a mask's sums pass for its gradient
// pass, which then needs neither the exp nor the reciprocal (the longest chain of an element's
// math). The halves rebuilt from it are those sigmoid_parts computes from x, bit for bit.
PYFAST_AVX2_INLINE V sigmoid_cache(const Parts& s, V x) {
  return _mm256_or_ps(s.small, _mm256_and_ps(x, set1(-0.0f)));
}

PYFAST_AVX2_INLINE Parts parts_from_cache(V cache) {
  return parts_from_small(V{}, _mm256_andnot_ps(set1(-0.0f), cache), cache);
}

// Targets as floats: a binary byte is 1 when non-zero.
PYFAST_AVX2_INLINE V load_targets(const uint8_t* t) {
  const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(t)));
  return _mm256_and_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(v, _mm256_setzero_si256())), set1(1.0f));
}
PYFAST_AVX2_INLINE V load_targets(const float* t) { return _mm256_loadu_ps(t); }

// Up to 8 elements into zero-padded lanes (the tail of a piece).
template <class TT> PYFAST_AVX2_INLINE void load_tail(const float* x, const TT* t, int64_t count, V& xv, V& tv) {
  alignas(32) float xs[8] = {0};
  alignas(32) TT ts[8] = {};
  std::memcpy(xs, x, count * sizeof(float));
  std::memcpy(ts, t, count * sizeof(TT));
  xv = _mm256_load_ps(xs);
  tv = load_targets(ts);
}

PYFAST_AVX2_INLINE V lanes_below(int64_t count) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count)), idx));
}

// Forward accumulators of one piece. Float targets also keep their least and greatest value:
// two operations per step where counting the ones outside [0, 1] takes five; a piece whose range
// leaves [0, 1] (a rare, raising case) is counted afterwards.
struct ForwardAcc {
  V ce, pt, p, t, tmin, tmax;
};

template <bool kMasked> PYFAST_AVX2_INLINE V kept(V v, V keep) { return kMasked ? _mm256_and_ps(v, keep) : v; }

// Adds one step's contributions; kMasked: only the lanes set in `keep` (a piece's tail, whose
// unset lanes hold logit 0 and target 0). Returns the step's sigmoid cache values.
template <bool kFloatTargets, bool kMasked> PYFAST_AVX2_INLINE V forward_step(V x, V t, V keep, ForwardAcc& acc) {
  const Parts s = sigmoid_parts(x);
  // ce = max(x, 0) - x t + log1p(e); max's second operand is returned for NaN, so NaN stays.
  const V ce = _mm256_add_ps(_mm256_fnmadd_ps(x, t, _mm256_max_ps(_mm256_setzero_ps(), x)), log1p_unit(s.e));
  acc.ce = _mm256_add_ps(acc.ce, kept<kMasked>(ce, keep));
  acc.pt = _mm256_fmadd_ps(s.p, t, acc.pt);  // a tail's unset lanes hold t = 0
  acc.p = _mm256_add_ps(acc.p, kept<kMasked>(s.p, keep));
  acc.t = _mm256_add_ps(acc.t, t);
  if (kFloatTargets) {
    // min/max return their second operand when one is NaN: a NaN target is not out of range
    // (bad_target's compares are false for it too).
    acc.tmin = _mm256_min_ps(t, acc.tmin);
    acc.tmax = _mm256_max_ps(t, acc.tmax);
  }
  return sigmoid_cache(s, x);
}

// Whether a piece's target range (ForwardAcc's tmin, tmax) leaves [0, 1] in any lane.
PYFAST_AVX2_INLINE bool range_leaves_unit(V tmin, V tmax) {
  const V below = _mm256_cmp_ps(tmin, _mm256_setzero_ps(), _CMP_LT_OQ);
  const V above = _mm256_cmp_ps(tmax, set1(1.0f), _CMP_GT_OQ);
  return _mm256_movemask_ps(_mm256_or_ps(below, above)) != 0;
}

PYFAST_AVX2_INLINE double lane_sum(V v) {
  alignas(32) float f[8];
  _mm256_store_ps(f, v);
  double s = 0.0;
  for (int l = 0; l < 8; ++l) s += static_cast<double>(f[l]);
  return s;
}

// The forward sums (kNumSums doubles, the focal sum 0) of count elements; kCache: also each
// element's sigmoid cache value into cache[0, count).
template <bool kCache, class TT>
PYFAST_AVX2_FN void forward_sums(const float* x, const TT* t, int64_t count, double* out, float* cache) {
  constexpr bool kFloatTargets = std::is_same<TT, float>::value;
  const V zero = _mm256_setzero_ps();
  ForwardAcc acc{zero, zero, zero, zero, zero, zero};
  int64_t i = 0;
  // Four independent steps per iteration, their chains interleaved. Every load comes before the
  // first store: the compiler cannot tell that the cache does not alias x or t, and a load after
  // a store would have to wait for it, serializing the steps.
  for (; i + 32 <= count; i += 32) {
    const V x0 = _mm256_loadu_ps(x + i), x1 = _mm256_loadu_ps(x + i + 8);
    const V x2 = _mm256_loadu_ps(x + i + 16), x3 = _mm256_loadu_ps(x + i + 24);
    const V t0 = load_targets(t + i), t1 = load_targets(t + i + 8);
    const V t2 = load_targets(t + i + 16), t3 = load_targets(t + i + 24);
    const V s0 = forward_step<kFloatTargets, false>(x0, t0, zero, acc);
    const V s1 = forward_step<kFloatTargets, false>(x1, t1, zero, acc);
    const V s2 = forward_step<kFloatTargets, false>(x2, t2, zero, acc);
    const V s3 = forward_step<kFloatTargets, false>(x3, t3, zero, acc);
    if (kCache) {
      _mm256_storeu_ps(cache + i, s0);
      _mm256_storeu_ps(cache + i + 8, s1);
      _mm256_storeu_ps(cache + i + 16, s2);
      _mm256_storeu_ps(cache + i + 24, s3);
    }
  }
  for (; i + 8 <= count; i += 8) {
    const V s0 = forward_step<kFloatTargets, false>(_mm256_loadu_ps(x + i), load_targets(t + i), zero, acc);
    if (kCache) _mm256_storeu_ps(cache + i, s0);
  }
  if (i < count) {
    V xv, tv;
    const int64_t left = count - i < 8 ? count - i : 8;
    load_tail(x + i, t + i, left, xv, tv);
    const V s = forward_step<kFloatTargets, true>(xv, tv, lanes_below(left), acc);
    if (kCache) {
      alignas(32) float values[8];
      _mm256_store_ps(values, s);
      std::memcpy(cache + i, values, left * sizeof(float));
    }
  }
  out[kSumCE] = lane_sum(acc.ce);
  out[kSumFocal] = 0.0;
  out[kSumPT] = lane_sum(acc.pt);
  out[kSumP] = lane_sum(acc.p);
  out[kSumT] = lane_sum(acc.t);
  out[kSumBadTargets] = 0.0;
  if (kFloatTargets && range_leaves_unit(acc.tmin, acc.tmax)) {
    double bad = 0.0;
    for (int64_t k = 0; k < count; ++k) bad += bad_target(static_cast<double>(t[k]));
    out[kSumBadTargets] = bad;
  }
}

// element_grad without the focal term: cb (p - t) + p q (cd1 - cd2 t).
PYFAST_AVX2_INLINE V grad_from_parts(const Parts& s, V t, const RowCoef<float>& c) {
  const V dice = _mm256_mul_ps(_mm256_mul_ps(s.p, s.q), _mm256_fnmadd_ps(set1(c.cd2), t, set1(c.cd1)));
  return _mm256_fmadd_ps(set1(c.cb), _mm256_sub_ps(s.p, t), dice);
}

// The gradient of count elements from their logits x, or (kCache) from the forward's sigmoid
// cache in x's place.
template <bool kCache> PYFAST_AVX2_INLINE V grad_step(V x, V t, const RowCoef<float>& c) {
  return grad_from_parts(kCache ? parts_from_cache(x) : sigmoid_parts(x), t, c);
}

template <bool kCache, class TT>
PYFAST_AVX2_FN void grad_range(const RowCoef<float>& c, int64_t count, const float* x, const TT* t, float* grad) {
  int64_t i = 0;
  for (; i + 32 <= count; i += 32) {  // four independent steps: their chains overlap
    const V g0 = grad_step<kCache>(_mm256_loadu_ps(x + i), load_targets(t + i), c);
    const V g1 = grad_step<kCache>(_mm256_loadu_ps(x + i + 8), load_targets(t + i + 8), c);
    const V g2 = grad_step<kCache>(_mm256_loadu_ps(x + i + 16), load_targets(t + i + 16), c);
    const V g3 = grad_step<kCache>(_mm256_loadu_ps(x + i + 24), load_targets(t + i + 24), c);
    _mm256_storeu_ps(grad + i, g0);
    _mm256_storeu_ps(grad + i + 8, g1);
    _mm256_storeu_ps(grad + i + 16, g2);
    _mm256_storeu_ps(grad + i + 24, g3);
  }
  for (; i + 8 <= count; i += 8) {
    _mm256_storeu_ps(grad + i, grad_step<kCache>(_mm256_loadu_ps(x + i), load_targets(t + i), c));
  }
  if (i < count) {
    V xv, tv;
    load_tail(x + i, t + i, count - i, xv, tv);
    alignas(32) float g[8];
    _mm256_store_ps(g, grad_step<kCache>(xv, tv, c));
    std::memcpy(grad + i, g, (count - i) * sizeof(float));
  }
}

inline bool available() {
  static const bool value = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return value;
}

#undef PYFAST_AVX2_FN
#undef PYFAST_AVX2_INLINE

}  // namespace avx2
}  // namespace mask
}  // namespace pyfast
#endif
