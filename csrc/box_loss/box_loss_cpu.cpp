// CPU kernels of the fused box loss: one pass over the boxes for the forward (loss and reduction
// together), one for the backward (recomputing from the inputs, nothing saved per box).
#include "box_loss/box_loss.h"

#include <vector>

#include "box_loss/box_loss_math.h"
#include "common/dispatch.h"
#include "common/parallel.h"

namespace pyfast {
namespace {

constexpr int64_t kBoxesPerBlock = 2048;
// Below ~16k boxes a second thread costs more to start than it saves.
constexpr int64_t kMinBlocksPerThread = 8;

template <class T, class Loss, class A = typename Acc<T>::type>
void forward_impl(const Loss& loss, int64_t n, const T* pred, const T* target, const A* weight, A* out, int output,
                  bool reduce, A scale, int num_threads) {
  const int64_t num_blocks = ceil_div(n, kBoxesPerBlock);
  // Per-block partial sums in double, added in block order: the result does not depend on the
  // thread count.
  std::vector<double> partial(reduce ? num_blocks : 0, 0.0);
  parallel_blocks(num_blocks, num_threads, kMinBlocksPerThread, [&](int64_t b) {
    const int64_t begin = b * kBoxesPerBlock, end = std::min(n, begin + kBoxesPerBlock);
    double acc = 0.0;
    for (int64_t i = begin; i < end; ++i) {
      A p[4], t[4];
      box::load_box(pred + 4 * i, p);
      box::load_box(target + 4 * i, t);
      if (output == box::kVariant) {
        out[i] = loss.variant(p, t);
        continue;
      }
      A value = loss.forward(p, t);
      if (weight) value *= weight[i];
      if (reduce) {
        acc += static_cast<double>(value);
      } else {
        out[i] = value;
      }
    }
    if (reduce) partial[b] = acc;
  });
  if (reduce) {
    double total = 0.0;
    for (double v : partial) total += v;
    out[0] = static_cast<A>(total * static_cast<double>(scale));
  }
}

template <class T, class Loss, class A = typename Acc<T>::type>
void backward_impl(const Loss& loss, int64_t n, const A* grad_out, bool grad_is_scalar, A scale, const T* pred,
                   const T* target, const A* weight, T* grad_pred, T* grad_target, A* grad_weight, int num_threads) {
  const A g_scalar = grad_is_scalar ? grad_out[0] * scale : A(0);
  parallel_blocks(ceil_div(n, kBoxesPerBlock), num_threads, kMinBlocksPerThread, [&](int64_t b) {
    const int64_t begin = b * kBoxesPerBlock, end = std::min(n, begin + kBoxesPerBlock);
    for (int64_t i = begin; i < end; ++i) {
      A p[4], t[4], gp[4], gt[4];
      box::load_box(pred + 4 * i, p);
      box::load_box(target + 4 * i, t);
      const A g = grad_is_scalar ? g_scalar : grad_out[i] * scale;
      if (grad_weight) grad_weight[i] = g * loss.forward(p, t);
      loss.backward(p, t, weight ? g * weight[i] : g, gp, gt);
      for (int k = 0; k < 4; ++k) grad_pred[4 * i + k] = from_acc<T>(gp[k]);
      if (grad_target) {
        for (int k = 0; k < 4; ++k) grad_target[4 * i + k] = from_acc<T>(gt[k]);
      }
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
