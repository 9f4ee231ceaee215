// Fused L1 + IoU-family box loss: the entry points behind pyfast.box_loss and pyfast.box_iou.
//
// Pointers are raw device or host addresses validated by pyfast/ops/box_loss.py. `pred`, `target`
// (and the gradients of both) hold n x 4 elements of `dtype`; `weight`, `grad_weight`, `out` and
// `grad_out` are in the accumulation type (float64 for float64 input, float32 otherwise).
#pragma once

#include <cstdint>

namespace pyfast {

struct BoxLossArgs {
  int64_t n;
  int dtype;           // DType code of pred/target
  int mode;            // box::Mode
  int format;          // box::Format
  double l1_weight;
  double iou_weight;
  double eps;
};

// Forward. output == kLoss: with reduce, out[0] = scale * sum_i weight_i * loss_i; without,
// out[i] = weight_i * loss_i. output == kVariant: out[i] = the IoU variant (reduce must be false).
// `workspace` (CUDA only) holds box_loss_cuda_workspace(n) accumulation-type elements.
void box_loss_forward_cpu(const BoxLossArgs& args, const void* pred, const void* target, const void* weight,
                          void* out, int output, bool reduce, double scale, int num_threads);
void box_loss_backward_cpu(const BoxLossArgs& args, const void* grad_out, bool grad_is_scalar, double scale,
                           const void* pred, const void* target, const void* weight, void* grad_pred,
                           void* grad_target, void* grad_weight, int num_threads);

#if PYFAST_WITH_CUDA
int64_t box_loss_cuda_workspace(int64_t n);
void box_loss_forward_cuda(const BoxLossArgs& args, const void* pred, const void* target, const void* weight,
                           void* out, int output, bool reduce, double scale, void* workspace, uintptr_t stream);
void box_loss_backward_cuda(const BoxLossArgs& args, const void* grad_out, bool grad_is_scalar, double scale,
                            const void* pred, const void* target, const void* weight, void* grad_pred,
                            void* grad_target, void* grad_weight, uintptr_t stream);
#endif

}  // namespace pyfast
