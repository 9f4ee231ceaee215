// CPU kernels of the fused mask loss. Forward: one pass over each mask accumulating its sums,
// then the loss and the reduction from those O(n) values. Backward: one elementwise pass that
// recomputes the sigmoid from the logits and reads the saved sums. mask_iou shares the forward's
// row-sum machinery.
#include "mask_loss/mask_loss.h"

#include <algorithm>
#include <vector>

#include "common/parallel.h"
#include "mask_loss/mask_loss_math.h"

// Element lambdas must inline into the AVX2 clones of the loops that call them.
#define PYFAST_ELEM_LAMBDA __attribute__((always_inline))

namespace pyfast {
namespace {

// Elements per block: the unit of threading and of partial sums. A mask longer than this is cut
// into chunks (so one 4096x4096 mask still uses every core); shorter masks are grouped whole.
// Fixed, so results do not depend on the thread count.
constexpr int64_t kChunk = 16384;
constexpr int64_t kMinBlocksPerThread = 2;
// Independent accumulators per sum: the lanes the compiler maps onto SIMD registers. Summing
// lane-wise keeps the order fixed without -ffast-math (which would also break NaN propagation).
constexpr int kLanes = 8;
// Elements per buffered tile of sum_range (kTile * K values stay in L1).
constexpr int kTile = 256;

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

// Per-mask sums (n x K, double) of elem over each mask, identical for any thread count.
template <int K, class A, class Elem>
std::vector<double> row_sums(int64_t n, int64_t m, int num_threads, const Elem& elem) {
  const Plan plan = make_plan(n, m);
  std::vector<double> partial(static_cast<size_t>(n * plan.chunks_per_row * K), 0.0);
  parallel_blocks(plan.num_blocks, num_threads, kMinBlocksPerThread, [&](int64_t b) {
    for_each_piece(plan, n, m, b, [&](int64_t, int64_t begin, int64_t end, int64_t slot) {
      sum_range<K, A>(begin, end, elem, partial.data() + slot * K);
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

template <class T, class TT, class Loss, class A = typename Acc<T>::type>
int64_t forward_impl(const MaskLossForward& args, const Loss& loss, int num_threads) {
  const T* logits = args.logits.as<const T>();
  const TT* targets = args.targets.as<const TT>();
  const std::vector<double> sums = row_sums<mask::kNumSums, A>(
      args.n, args.m, num_threads,
      [&](int64_t i, A* v) PYFAST_ELEM_LAMBDA { loss.forward(to_acc<A>(logits[i]), mask::load_target<A>(targets[i]), v); });
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

template <class T, class TT, class Loss, class A = typename Acc<T>::type>
void backward_impl(const MaskLossBackward& args, const Loss& loss, int num_threads) {
  const T* logits = args.logits.as<const T>();
  const TT* targets = args.targets.as<const TT>();
  const A* sums = args.sums.as<const A>();
  const A* grad_out = args.grad_out.as<const A>();
  T* grad_logits = args.grad_logits.as<T>();
  const bool grad_is_scalar = args.reduction != Reduction::None;
  const double scale = reduction_scale(args.reduction, args.n, args.avg_factor);
  const mask::RowMath<A> rm = mask::row_math<A>(args.options, args.m);
  const Plan plan = make_plan(args.n, args.m);
  parallel_blocks(plan.num_blocks, num_threads, kMinBlocksPerThread, [&](int64_t b) {
    for_each_piece(plan, args.n, args.m, b, [&](int64_t row, int64_t begin, int64_t end, int64_t) {
      const A g = (grad_is_scalar ? grad_out[0] : grad_out[row]) * A(scale);
      const mask::RowCoef<A> c = mask::row_coef(rm, sums + row * mask::kNumSums, g);
      grad_range(loss, c, end - begin, logits + begin, targets + begin, grad_logits + begin);
    });
  });
}

template <class T, class TT, class A = typename Acc<T>::type>
int64_t iou_impl(const MaskIoU& args, int num_threads) {
  const T* logits = args.logits.as<const T>();
  const TT* targets = args.targets.as<const TT>();
  const A threshold = A(args.threshold);
  const std::vector<double> sums = row_sums<mask::kNumIoUSums, A>(
      args.n, args.m, num_threads,
      [&](int64_t i, A* v) PYFAST_ELEM_LAMBDA { mask::iou_element(to_acc<A>(logits[i]), mask::load_target<A>(targets[i]), threshold, v); });
  A* iou = args.iou.as<A>();
  int64_t bad_masks = 0;
  for (int64_t row = 0; row < args.n; ++row) {
    const double* s = sums.data() + row * mask::kNumIoUSums;
    bad_masks += s[mask::kIoUBadTargets] > 0.0;
    iou[row] = static_cast<A>(mask::iou_from_sums<double>(s));
  }
  return bad_masks;
}

}  // namespace

int64_t mask_loss_forward_cpu(const MaskLossForward& args, int num_threads) {
  int64_t bad_masks = 0;
  mask::dispatch_types(args.dtype, args.target_dtype, [&](auto tag, auto target_tag) {
    using T = decltype(tag);
    using TT = decltype(target_tag);
    using A = typename Acc<T>::type;
    mask::dispatch_focal<A>(args.options,
                            [&](const auto& loss) { bad_masks = forward_impl<T, TT>(args, loss, num_threads); });
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
