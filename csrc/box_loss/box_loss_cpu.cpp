// CPU kernels of the fused box loss: one pass over the boxes for the forward (loss and reduction
// together), one for the backward (recomputing from the inputs, nothing saved per box).
#include "box_loss/box_loss.h"

#include <type_traits>
#include <vector>

#include "box_loss/box_loss_math.h"
#include "common/dispatch.h"
#include "common/parallel.h"

namespace pyfast {
namespace {

constexpr int64_t kBoxesPerBlock = 2048;
// Below ~16k boxes a second thread costs more to start than it saves.
constexpr int64_t kMinBlocksPerThread = 8;

// The per-box loops below are branch-free maps over one block (the weight and output choices are
// template parameters) so that the compiler vectorizes them.
template <bool VARIANT, bool WEIGHTED, class T, class Loss, class A>
PYFAST_SIMD_CLONES void map_block(const Loss& loss, int64_t count, const T* pred, const T* target, const A* weight, A* out) {
  for (int64_t j = 0; j < count; ++j) {
    A p[4], t[4];
    box::load_box(pred + 4 * j, p);
    box::load_box(target + 4 * j, t);
    A value = VARIANT ? loss.variant(p, t) : loss.forward(p, t);
    if (WEIGHTED) value *= weight[j];
    out[j] = value;
  }
}

// Sum in kLanes independent accumulators (vectorizable without reassociating), then in double.
template <class A> double sum_block(const A* values, int64_t count) {
  constexpr int kLanes = 16;
  A lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= count; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) lanes[l] += values[j + l];
  }
  double total = 0.0;
  for (; j < count; ++j) total += static_cast<double>(values[j]);
  for (int l = 0; l < kLanes; ++l) total += static_cast<double>(lanes[l]);
  return total;
}

template <class T, class Loss, class A = typename Acc<T>::type>
void forward_impl(const Loss& loss, int64_t n, const T* pred, const T* target, const A* weight, A* out, int output,
                  bool reduce, A scale, int num_threads) {
  const int64_t num_blocks = ceil_div(n, kBoxesPerBlock);
  // Per-block partial sums in double, added in block order: the result does not depend on the
  // thread count.
  std::vector<double> partial(reduce ? num_blocks : 0, 0.0);
  parallel_blocks(num_blocks, num_threads, kMinBlocksPerThread, [&](int64_t b) {
    const int64_t begin = b * kBoxesPerBlock, count = std::min(n, begin + kBoxesPerBlock) - begin;
    const T* p = pred + 4 * begin;
    const T* t = target + 4 * begin;
    const A* w = weight ? weight + begin : nullptr;
    A scratch[kBoxesPerBlock];
    A* dst = reduce ? scratch : out + begin;
    if (output == box::kVariant) {
      map_block<true, false>(loss, count, p, t, w, dst);
    } else if (w) {
      map_block<false, true>(loss, count, p, t, w, dst);
    } else {
      map_block<false, false>(loss, count, p, t, w, dst);
    }
    if (reduce) partial[b] = sum_block(scratch, count);
  });
  if (reduce) {
    double total = 0.0;
    for (double v : partial) total += v;
    out[0] = static_cast<A>(total * static_cast<double>(scale));
  }
}

template <bool SCALAR_GRAD, bool WEIGHTED, bool TARGET_GRAD, class T, class Loss, class A>
PYFAST_SIMD_CLONES void backward_block(const Loss& loss, int64_t count, const A* grad_out, A g_scalar, A scale, const T* pred,
                    const T* target, const A* weight, T* grad_pred, T* grad_target) {
  for (int64_t j = 0; j < count; ++j) {
    A p[4], t[4], gp[4], gt[4];
    box::load_box(pred + 4 * j, p);
    box::load_box(target + 4 * j, t);
    A g = SCALAR_GRAD ? g_scalar : grad_out[j] * scale;
    if (WEIGHTED) g *= weight[j];
    loss.backward(p, t, g, gp, gt);
    for (int k = 0; k < 4; ++k) grad_pred[4 * j + k] = from_acc<T>(gp[k]);
    if (TARGET_GRAD) {
      for (int k = 0; k < 4; ++k) grad_target[4 * j + k] = from_acc<T>(gt[k]);
    }
  }
}

template <class T, class Loss, class A = typename Acc<T>::type>
void backward_impl(const Loss& loss, int64_t n, const A* grad_out, bool grad_is_scalar, A scale, const T* pred,
                   const T* target, const A* weight, T* grad_pred, T* grad_target, A* grad_weight, int num_threads) {
  const A g_scalar = grad_is_scalar ? grad_out[0] * scale : A(0);
  parallel_blocks(ceil_div(n, kBoxesPerBlock), num_threads, kMinBlocksPerThread, [&](int64_t b) {
    const int64_t begin = b * kBoxesPerBlock, count = std::min(n, begin + kBoxesPerBlock) - begin;
    const T* p = pred + 4 * begin;
    const T* t = target + 4 * begin;
    const A* g = grad_is_scalar ? grad_out : grad_out + begin;
    const A* w = weight ? weight + begin : nullptr;
    T* gp = grad_pred + 4 * begin;
    T* gt = grad_target ? grad_target + 4 * begin : nullptr;
    if (grad_weight) {
      // d loss / d weight_i = g_i * unweighted loss_i
      for (int64_t j = 0; j < count; ++j) {
        A pb[4], tb[4];
        box::load_box(p + 4 * j, pb);
        box::load_box(t + 4 * j, tb);
        grad_weight[begin + j] = (grad_is_scalar ? g_scalar : g[j] * scale) * loss.forward(pb, tb);
      }
    }
    // Eight specializations: the common case (scalar grad, no weight, pred only) stays branch-free.
    auto run = [&](auto scalar, auto weighted, auto target_grad) {
      backward_block<decltype(scalar)::value, decltype(weighted)::value, decltype(target_grad)::value>(
          loss, count, g, g_scalar, scale, p, t, w, gp, gt);
    };
    auto with_target = [&](auto scalar, auto weighted) {
      if (gt) {
        run(scalar, weighted, std::true_type{});
      } else {
        run(scalar, weighted, std::false_type{});
      }
    };
    auto with_weight = [&](auto scalar) {
      if (w) {
        with_target(scalar, std::true_type{});
      } else {
        with_target(scalar, std::false_type{});
      }
    };
    if (grad_is_scalar) {
      with_weight(std::true_type{});
    } else {
      with_weight(std::false_type{});
    }
  });
}

}  // namespace

void box_loss_forward_cpu(const BoxLossArgs& args, const void* pred, const void* target, const void* weight,
                          void* out, int output, bool reduce, double scale, int num_threads) {
  dispatch_float(args.dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    box::dispatch_box_loss<A>(args.mode, args.format, A(args.l1_weight), A(args.iou_weight), A(args.eps),
                              [&](const auto& loss) {
                                forward_impl<T>(loss, args.n, static_cast<const T*>(pred),
                                                static_cast<const T*>(target), static_cast<const A*>(weight),
                                                static_cast<A*>(out), output, reduce, A(scale), num_threads);
                              });
  });
}

void box_loss_backward_cpu(const BoxLossArgs& args, const void* grad_out, bool grad_is_scalar, double scale,
                           const void* pred, const void* target, const void* weight, void* grad_pred,
                           void* grad_target, void* grad_weight, int num_threads) {
  dispatch_float(args.dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    box::dispatch_box_loss<A>(
        args.mode, args.format, A(args.l1_weight), A(args.iou_weight), A(args.eps), [&](const auto& loss) {
          backward_impl<T>(loss, args.n, static_cast<const A*>(grad_out), grad_is_scalar, A(scale),
                           static_cast<const T*>(pred), static_cast<const T*>(target), static_cast<const A*>(weight),
                           static_cast<T*>(grad_pred), static_cast<T*>(grad_target), static_cast<A*>(grad_weight),
                           num_threads);
        });
  });
}

}  // namespace pyfast
