// CPU kernels of the fused mask loss. Forward: one pass over each mask accumulating its sums,
// then the loss and the reduction from those O(n) values. Backward: one elementwise pass that
// recomputes the sigmoid from the logits and reads the saved sums. mask_iou shares the forward's
// row-sum machinery. The common case (float32 logits, binary or float32 targets, no focal term)
// runs hand-vectorized AVX2 bodies (mask_loss_avx2.h) where the CPU has them, and there the
// forward can also write the gradient (forward_sums_with_grad).
#include "mask_loss/mask_loss.h"

#include <algorithm>
#include <atomic>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "common/parallel.h"
#include "mask_loss/mask_loss_avx2.h"
#include "mask_loss/mask_loss_math.h"

namespace pyfast {
namespace {

// Elements per block: the unit of threading and of partial sums. A mask longer than this is cut
// into chunks (so one 4096x4096 mask still uses every core); shorter masks are grouped whole.
// Fixed, so results do not depend on the thread count.
constexpr int64_t kChunk = kMaskCpuChunk;
constexpr int64_t kMinBlocksPerThread = 2;
// Independent accumulators per sum: the lanes the compiler maps onto SIMD registers. Summing
// lane-wise keeps the order fixed without -ffast-math (which would also break NaN propagation).
constexpr int kLanes = 8;
// Elements per buffered tile of sum_range (kTile * K values stay in L1).
constexpr int kTile = 256;

// Set by tests to run the portable loops on machines that have AVX2.
std::atomic<bool> force_generic{false};

// Whether the AVX2 bodies handle logits T, targets TT and focal mode FOCAL on this CPU.
template <class T, class TT, int FOCAL> bool use_avx2() {
#ifdef PYFAST_MASK_AVX2
  constexpr bool handled = std::is_same<T, float>::value && FOCAL == mask::kNoFocal &&
                           (std::is_same<TT, uint8_t>::value || std::is_same<TT, float>::value);
  return handled && mask::avx2::available() && !force_generic.load(std::memory_order_relaxed);
#else
  return false;
#endif
}

struct Plan {
  int64_t chunks_per_row;  // > 1 only when rows_per_block == 1
  int64_t rows_per_block;
  int64_t num_blocks;
};

Plan make_plan(int64_t n, int64_t m) {
  if (n == 0 || m == 0) return {1, 1, 0};
  if (m > kChunk) {
    const int64_t cpr = ceil_div(m, kChunk);
    return {cpr, 1, n * cpr};
  }
  const int64_t rpb = std::max<int64_t>(1, kChunk / m);
  return {1, rpb, ceil_div(n, rpb)};
}

// Calls fn(row, begin, end, slot) for each contiguous piece [begin, end) (flat element indices)
// of block b; slot numbers the piece's partial result (row * chunks_per_row + chunk).
template <class Fn> void for_each_piece(const Plan& plan, int64_t n, int64_t m, int64_t b, Fn&& fn) {
  if (plan.chunks_per_row > 1) {
    const int64_t row = b / plan.chunks_per_row, c = b % plan.chunks_per_row;
    const int64_t begin = c * kChunk, end = std::min(m, begin + kChunk);
    fn(row, row * m + begin, row * m + end, b);
    return;
  }
  const int64_t r_end = std::min(n, (b + 1) * plan.rows_per_block);
  for (int64_t row = b * plan.rows_per_block; row < r_end; ++row) fn(row, row * m, row * m + m, row);
}

// buf[k][j] = the k-th value of elem(start + j) for j < len, zero up to kTile: the elementwise
// half of sum_range, a branch-free map the compiler vectorizes (AVX2 where the CPU has it).
template <int K, class A, class Elem>
PYFAST_SIMD_CLONES void fill_tile(const Elem& elem, int64_t start, int len, A (*buf)[kTile]) {
  for (int j = 0; j < len; ++j) {
    A v[K];
    elem(start + j, v);
    for (int k = 0; k < K; ++k) buf[k][j] = v[k];
  }
  for (int k = 0; k < K; ++k) {
    for (int j = len; j < kTile; ++j) buf[k][j] = A(0);  // a short last tile adds zeros
  }
}

// Sums the K values elem(i, v) over [begin, end) into out[0..K) (double), tile by tile: fill a
// small buffer, then add it lane-wise. Fused into one loop, the reduction would stay scalar.
template <int K, class A, class Elem> void sum_range(int64_t begin, int64_t end, const Elem& elem, double* out) {
  A acc[K][kLanes] = {};
  alignas(64) A buf[K][kTile];
  for (int64_t start = begin; start < end; start += kTile) {
    fill_tile<K>(elem, start, static_cast<int>(std::min<int64_t>(kTile, end - start)), buf);
    for (int k = 0; k < K; ++k) {
      for (int j = 0; j < kTile; j += kLanes) {
        for (int l = 0; l < kLanes; ++l) acc[k][l] += buf[k][j + l];
      }
    }
  }
  for (int k = 0; k < K; ++k) {
    double s = 0.0;
    for (int l = 0; l < kLanes; ++l) s += static_cast<double>(acc[k][l]);
    out[k] = s;
  }
}

// Per-mask sums (n x K, double), identical for any thread count: range(begin, end, out) writes the
// K sums of the flat elements [begin, end) to out.
template <int K, class Range>
std::vector<double> row_sums(int64_t n, int64_t m, int num_threads, const Range& range) {
  const Plan plan = make_plan(n, m);
  std::vector<double> partial(static_cast<size_t>(n * plan.chunks_per_row * K), 0.0);
  parallel_blocks(plan.num_blocks, num_threads, kMinBlocksPerThread, [&](int64_t b) {
    for_each_piece(plan, n, m, b, [&](int64_t, int64_t begin, int64_t end, int64_t slot) {
      range(begin, end, partial.data() + slot * K);
    });
  });
  if (plan.chunks_per_row == 1) return partial;
  std::vector<double> sums(static_cast<size_t>(n * K), 0.0);
  for (int64_t row = 0; row < n; ++row) {
    for (int64_t c = 0; c < plan.chunks_per_row; ++c) {
      for (int k = 0; k < K; ++k) sums[row * K + k] += partial[(row * plan.chunks_per_row + c) * K + k];
    }
  }
  return sums;
}

template <class T, class TT, int FOCAL, class A>
std::vector<double> forward_sums(const MaskLossForward& args, const mask::MaskLoss<FOCAL, A>& loss, int num_threads) {
  const T* logits = args.logits.as<const T>();
  const TT* targets = args.targets.as<const TT>();
#ifdef PYFAST_MASK_AVX2
  if constexpr (std::is_same<T, float>::value && FOCAL == mask::kNoFocal &&
                (std::is_same<TT, uint8_t>::value || std::is_same<TT, float>::value)) {
    if (use_avx2<T, TT, FOCAL>()) {
      return row_sums<mask::kNumSums>(args.n, args.m, num_threads, [&](int64_t begin, int64_t end, double* out) {
        mask::avx2::forward_sums<false>(logits + begin, targets + begin, end - begin, out, nullptr);
      });
    }
  }
#endif
  auto elem = [&](int64_t i, A* v) PYFAST_ELEM_LAMBDA {
    loss.forward(to_acc<A>(logits[i]), mask::load_target<A>(targets[i]), v);
  };
  return row_sums<mask::kNumSums>(args.n, args.m, num_threads, [&](int64_t begin, int64_t end, double* out) {
    sum_range<mask::kNumSums, A>(begin, end, elem, out);
  });
}

#ifdef PYFAST_MASK_AVX2
// The forward's sums and, for grad_out = 1, the gradient (gradient_in_forward's case). Each mask
// in two passes while its elements stay in cache: the sums, storing each element's sigmoid cache
// value where its gradient goes; then, with the mask's coefficients known, the gradient from that
// cache, in place. The sums are those of forward_sums, bit for bit (the
// same pieces, added in the same order), and the gradient that of backward_impl for grad_out = 1.
template <class TT>
std::vector<double> forward_sums_with_grad(const MaskLossForward& args, int num_threads) {
  const int64_t n = args.n, m = args.m;
  const float* logits = args.logits.as<const float>();
  const TT* targets = args.targets.as<const TT>();
  float* grad = args.grad_logits.as<float>();
  const mask::RowMath<float> rm = mask::row_math<float>(args.options, m);
  const float g = float(reduction_scale(args.reduction, n, args.avg_factor));  // backward_impl's g, grad_out = 1
  const Plan plan = make_plan(n, m);
  std::vector<double> sums(static_cast<size_t>(n * mask::kNumSums), 0.0);
  auto row = [&](int64_t r) {
    double* s = sums.data() + r * mask::kNumSums;
    const int64_t base = r * m;
    if (plan.chunks_per_row == 1) {
      mask::avx2::forward_sums<true>(logits + base, targets + base, m, s, grad + base);
    } else {  // row_sums' order: each chunk's sums, added to 0 chunk by chunk
      for (int64_t begin = 0; begin < m; begin += kChunk) {
        double part[mask::kNumSums];
        const int64_t count = std::min(kChunk, m - begin);
        mask::avx2::forward_sums<true>(logits + base + begin, targets + base + begin, count, part, grad + base + begin);
        for (int k = 0; k < mask::kNumSums; ++k) s[k] += part[k];
      }
    }
    float saved[mask::kNumSums];  // the sums as the forward saves them, which the backward reads
    for (int k = 0; k < mask::kNumSums; ++k) saved[k] = static_cast<float>(s[k]);
    const mask::RowCoef<float> c = mask::row_coef(rm, saved, g);
    mask::avx2::grad_range<true>(c, m, grad + base, targets + base, grad + base);
  };
  if (plan.chunks_per_row == 1) {
    parallel_blocks(plan.num_blocks, num_threads, kMinBlocksPerThread, [&](int64_t b) {
      const int64_t r_end = std::min(n, (b + 1) * plan.rows_per_block);
      for (int64_t r = b * plan.rows_per_block; r < r_end; ++r) row(r);
    });
  } else {
    parallel_blocks(n, num_threads, 1, row);
  }
  return sums;
}
#endif

template <class T, class TT, class Loss, class A = typename Acc<T>::type>
int64_t forward_impl(const MaskLossForward& args, const Loss& loss, int num_threads) {
  std::vector<double> sums;
#ifdef PYFAST_MASK_AVX2
  if constexpr (std::is_same<T, float>::value && (std::is_same<TT, uint8_t>::value || std::is_same<TT, float>::value)) {
    if (args.grad_logits) sums = forward_sums_with_grad<TT>(args, num_threads);
  }
#endif
  if (!args.grad_logits) sums = forward_sums<T, TT>(args, loss, num_threads);
  const mask::RowMath<A> rm = mask::row_math<A>(args.options, args.m);
  A* sums_out = args.sums.as<A>();
  A* out = args.out.as<A>();
  const bool reduce = args.reduction != Reduction::None;
  double total = 0.0;
  int64_t bad_masks = 0;
  for (int64_t row = 0; row < args.n; ++row) {
    const double* s = sums.data() + row * mask::kNumSums;
    for (int k = 0; k < mask::kNumSums; ++k) sums_out[row * mask::kNumSums + k] = static_cast<A>(s[k]);
    bad_masks += s[mask::kSumBadTargets] > 0.0;
    const double value = rm.template loss<double>(s);
    if (reduce) {
      total += value;
    } else {
      out[row] = static_cast<A>(value);
    }
  }
  if (reduce) out[0] = static_cast<A>(total * reduction_scale(args.reduction, args.n, args.avg_factor));
  return bad_masks;
}

// The backward's elementwise map over one piece of a mask.
template <class T, class TT, class Loss, class A>
PYFAST_SIMD_CLONES void grad_range(const Loss& loss, const mask::RowCoef<A>& c, int64_t count, const T* logits,
                                   const TT* targets, T* grad_logits) {
  for (int64_t i = 0; i < count; ++i) {
    grad_logits[i] = from_acc<T>(mask::element_grad(loss, c, to_acc<A>(logits[i]), mask::load_target<A>(targets[i])));
  }
}

template <class T, class TT, int FOCAL, class A = typename Acc<T>::type>
void backward_impl(const MaskLossBackward& args, const mask::MaskLoss<FOCAL, A>& loss, int num_threads) {
  const T* logits = args.logits.as<const T>();
  const TT* targets = args.targets.as<const TT>();
  const A* sums = args.sums.as<const A>();
  const A* grad_out = args.grad_out.as<const A>();
  T* grad_logits = args.grad_logits.as<T>();
  const bool grad_is_scalar = args.reduction != Reduction::None;
  const double scale = reduction_scale(args.reduction, args.n, args.avg_factor);
  const mask::RowMath<A> rm = mask::row_math<A>(args.options, args.m);
  const Plan plan = make_plan(args.n, args.m);
  const bool avx2 = use_avx2<T, TT, FOCAL>();
  parallel_blocks(plan.num_blocks, num_threads, kMinBlocksPerThread, [&](int64_t b) {
    for_each_piece(plan, args.n, args.m, b, [&](int64_t row, int64_t begin, int64_t end, int64_t) {
      const A g = (grad_is_scalar ? grad_out[0] : grad_out[row]) * A(scale);
      const mask::RowCoef<A> c = mask::row_coef(rm, sums + row * mask::kNumSums, g);
#ifdef PYFAST_MASK_AVX2
      if constexpr (std::is_same<T, float>::value && FOCAL == mask::kNoFocal &&
                    (std::is_same<TT, uint8_t>::value || std::is_same<TT, float>::value)) {
        if (avx2) {
          return mask::avx2::grad_range<false>(c, end - begin, logits + begin, targets + begin, grad_logits + begin);
        }
      }
#endif
      grad_range(loss, c, end - begin, logits + begin, targets + begin, grad_logits + begin);
    });
  });
}

template <class T, class TT, class A = typename Acc<T>::type>
int64_t iou_impl(const MaskIoU& args, int num_threads) {
  const T* logits = args.logits.as<const T>();
  const TT* targets = args.targets.as<const TT>();
  const A threshold = A(args.threshold);
  auto elem = [&](int64_t i, A* v) PYFAST_ELEM_LAMBDA {
    mask::iou_element(to_acc<A>(logits[i]), mask::load_target<A>(targets[i]), threshold, v);
  };
  const std::vector<double> sums = row_sums<mask::kNumIoUSums>(
      args.n, args.m, num_threads,
      [&](int64_t begin, int64_t end, double* out) { sum_range<mask::kNumIoUSums, A>(begin, end, elem, out); });
  A* iou = args.iou.as<A>();
  int64_t bad_masks = 0;
  for (int64_t row = 0; row < args.n; ++row) {
    const double* s = sums.data() + row * mask::kNumIoUSums;
    bad_masks += s[mask::kIoUBadTargets] > 0.0;
    iou[row] = static_cast<A>(mask::iou_from_sums<double>(s));
  }
  return bad_masks;
}

// Whether forward_sums_with_grad covers the arguments: float32 logits, binary or float32 targets,
// no focal term, a reduction, masks of at most kMaskCpuMaxGradientInForward elements (the mask's
// elements stay in cache between its two passes), a CPU with AVX2 + FMA and the fast loops not
// forced off.
bool gradient_in_forward(const MaskLossForward& args) {
  if (focal_mode(args.options) != mask::kNoFocal || args.reduction == Reduction::None ||
      args.m > kMaskCpuMaxGradientInForward) {
    return false;
  }
  bool supported = false;
  mask::dispatch_types(args.dtype, args.target_dtype, [&](auto tag, auto target_tag) {
    supported = use_avx2<decltype(tag), decltype(target_tag), mask::kNoFocal>();
  });
  return supported;
}

// The backward of a forward's arguments for grad_out = *one (the forward's sums already written).
MaskLossBackward backward_for_unit_grad(const MaskLossForward& args, const void* one) {
  MaskLossBackward backward;
  backward.options = args.options;
  backward.n = args.n;
  backward.m = args.m;
  backward.dtype = args.dtype;
  backward.target_dtype = args.target_dtype;
  backward.logits = args.logits;
  backward.targets = args.targets;
  backward.sums = args.sums;
  backward.reduction = args.reduction;
  backward.avg_factor = args.avg_factor;
  backward.grad_out = Address{reinterpret_cast<uintptr_t>(one)};
  backward.grad_logits = args.grad_logits;
  return backward;
}

}  // namespace

void mask_loss_cpu_force_generic(bool on) { force_generic.store(on); }

int64_t mask_loss_forward_cpu(const MaskLossForward& args, int num_threads) {
  if (args.grad_logits && args.reduction == Reduction::None) {
    throw std::invalid_argument(
        "pyfast: mask_loss_forward writes grad_logits for a reduced loss (sum or mean) only, got reduction none");
  }
  // The gradient while each mask is in cache where the fused loops cover the arguments; otherwise
  // the forward and then the backward kernel for grad_out = 1, the same numbers in two passes.
  const bool fused = args.grad_logits && gradient_in_forward(args);
  MaskLossForward forward = args;
  if (!fused) forward.grad_logits = Address{};
  int64_t bad_masks = 0;
  mask::dispatch_types(args.dtype, args.target_dtype, [&](auto tag, auto target_tag) {
    using T = decltype(tag);
    using TT = decltype(target_tag);
    using A = typename Acc<T>::type;
    mask::dispatch_focal<A>(args.options, [&](const auto& loss) {
      bad_masks = forward_impl<T, TT>(forward, loss, num_threads);
      if (args.grad_logits && !fused) {
        const A one = A(1);
        backward_impl<T, TT>(backward_for_unit_grad(args, &one), loss, num_threads);
      }
    });
  });
  return bad_masks;
}

void mask_loss_backward_cpu(const MaskLossBackward& args, int num_threads) {
  mask::dispatch_types(args.dtype, args.target_dtype, [&](auto tag, auto target_tag) {
    using T = decltype(tag);
    using TT = decltype(target_tag);
    using A = typename Acc<T>::type;
    mask::dispatch_focal<A>(args.options, [&](const auto& loss) { backward_impl<T, TT>(args, loss, num_threads); });
  });
}

int64_t mask_iou_cpu(const MaskIoU& args, int num_threads) {
  int64_t bad_masks = 0;
  mask::dispatch_types(args.dtype, args.target_dtype, [&](auto tag, auto target_tag) {
    bad_masks = iou_impl<decltype(tag), decltype(target_tag)>(args, num_threads);
  });
  return bad_masks;
}

}  // namespace pyfast
