// Fused BCE + dice + focal mask loss and mask IoU: the entry points behind pyfast.mask_loss and
// pyfast.mask_iou.
//
// Pointers are raw device or host addresses validated by pyfast/ops/mask_loss.py. `logits` (and
// its gradient) hold n x m elements of `dtype`; `targets` hold n x m elements of `target_dtype`
// (a float DType code, or mask::kTargetUInt8 for bool/uint8 masks). `sums` holds n x
// mask::kNumSums per-mask sums, `out`, `grad_out` and `iou` are in the accumulation type
// (float64 for float64 logits, float32 otherwise).
#pragma once

#include <cstdint>

namespace pyfast {

struct MaskLossArgs {
  int64_t n;  // masks
  int64_t m;  // elements per mask
  int dtype;
  int target_dtype;
  int focal;  // mask::Focal
  double bce_weight;
  double dice_weight;
  double focal_weight;
  double alpha;  // < 0: no class weighting
  double gamma;
  double smooth;
};

// Forward: writes the per-mask sums and the loss: with reduce, out[0] = scale * sum_i loss_i;
// without, out[i] = loss_i.
void mask_loss_forward_cpu(const MaskLossArgs& args, const void* logits, const void* targets, void* sums, void* out,
                           bool reduce, double scale, int num_threads);
// Backward: grad_logits = d(loss)/d(logits) * grad_out * scale, from the saved sums.
void mask_loss_backward_cpu(const MaskLossArgs& args, const void* grad_out, bool grad_is_scalar, double scale,
                            const void* logits, const void* targets, const void* sums, void* grad_logits,
                            int num_threads);
// iou[i] = |x > threshold AND t| / max(|x > threshold OR t|, 1), NaN when a logit is NaN.
void mask_iou_cpu(const MaskLossArgs& args, double threshold, const void* logits, const void* targets, void* iou,
                  int num_threads);

#if PYFAST_WITH_CUDA
// Accumulation-type elements of workspace that the forward and mask_iou need.
int64_t mask_loss_cuda_workspace(int64_t n, int64_t m);
void mask_loss_forward_cuda(const MaskLossArgs& args, const void* logits, const void* targets, void* sums,
                            void* out, bool reduce, double scale, void* workspace, uintptr_t stream);
// `workspace` holds mask_loss_cuda_workspace(n, m) accumulation-type elements.
void mask_loss_backward_cuda(const MaskLossArgs& args, const void* grad_out, bool grad_is_scalar, double scale,
                             const void* logits, const void* targets, const void* sums, void* grad_logits,
                             void* workspace, uintptr_t stream);
void mask_iou_cuda(const MaskLossArgs& args, double threshold, const void* logits, const void* targets, void* iou,
                   void* workspace, uintptr_t stream);
#endif

}  // namespace pyfast
