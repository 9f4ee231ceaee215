// Fused BCE + dice + focal mask loss and mask IoU: the entry points behind pyfast.mask_loss and
// pyfast.mask_iou.
//
// Addresses are validated by pyfast/ops/mask_loss.py. `logits` (and its gradient) hold n x m
// elements of `dtype`; `targets` hold n x m elements of `target_dtype` (a float DType, or UInt8 for
// binary bool/uint8 masks). `sums` holds n x mask::kNumSums per-mask sums; `out`, `grad_out` and
// `iou` are in the accumulation type (float64 for float64 logits, float32 otherwise).
//
// Float targets are probabilities: a mask with a float target outside [0, 1] (a 0/255 mask passed
// as float, a negative value) has no valid loss or IoU. The kernels count such targets per mask
// (the kSumBadTargets sum) and give that mask a NaN loss and a NaN IoU, so no wrong number comes
// out. The CPU entry points also return how many masks were affected, so the caller can raise at
// no cost; on CUDA that needs a host sync, which the caller does only when asked to.
#pragma once

#include <cstdint>

#include "common/op_args.h"
#include "common/types.h"

namespace pyfast {
namespace mask {

// Which focal term the kernels compile in: none (focal_weight == 0), the gamma == 2 shortcut, or
// any gamma >= 0.
enum Focal : int { kNoFocal = 0, kFocalGamma2 = 1, kFocalGeneral = 2 };
// Per-mask sums saved by the forward.
enum Sum : int { kSumCE = 0, kSumFocal = 1, kSumPT = 2, kSumP = 3, kSumT = 4, kSumBadTargets = 5, kNumSums = 6 };
// Per-mask sums of mask_iou.
enum IoUSum : int { kIoUInter = 0, kIoUUnion = 1, kIoUNaN = 2, kIoUBadTargets = 3, kNumIoUSums = 4 };

}  // namespace mask

// The CPU kernels' work unit (elements; masks longer than this are cut into chunks of it, shorter
// ones grouped) and the largest mask whose gradient the forward computes in the same pass (its
// elements stay in cache between the two). Exported by the module, so that pyfast/ops/mask_loss.py
// routes calls by the same numbers.
constexpr int64_t kMaskCpuChunk = 16384;
constexpr int64_t kMaskCpuMaxGradientInForward = int64_t(1) << 18;

// The op's options: the keyword arguments of pyfast.mask_loss that shape the per-mask math.
struct MaskLossOptions {
  double bce_weight = 1.0;
  double dice_weight = 1.0;
  double focal_weight = 0.0;
  double alpha = 0.25;  // < 0: no class weighting
  double gamma = 2.0;
  double smooth = 1.0;
};

inline mask::Focal focal_mode(const MaskLossOptions& options) {
  if (options.focal_weight == 0.0) return mask::kNoFocal;
  return options.gamma == 2.0 ? mask::kFocalGamma2 : mask::kFocalGeneral;
}

// Forward: writes the per-mask sums and the loss: with a reduction, out[0] = scale * sum_i loss_i
// (scale from reduction_scale); without, out[i] = loss_i.
struct MaskLossForward {
  MaskLossOptions options;
  int64_t n = 0;  // masks
  int64_t m = 0;  // elements per mask
  DType dtype = DType::Float32;
  DType target_dtype = DType::UInt8;
  Address logits, targets;
  Reduction reduction = Reduction::None;
  double avg_factor = 0.0;  // <= 0: none
  Address sums, out;
  // Not null (a reduction; CPU only): also writes d out[0] / d logits, the backward for
  // grad_out = 1. Float32 logits, binary or float32 targets, no focal term and masks of at most
  // 2^18 elements on an AVX2 CPU get each mask's gradient while its elements are still in cache;
  // anything else runs the backward kernel after the forward.
  Address grad_logits;
};

// Backward: grad_logits = d(loss)/d(logits) * grad_out * scale, from the forward's sums.
struct MaskLossBackward {
  MaskLossOptions options;
  int64_t n = 0;
  int64_t m = 0;
  DType dtype = DType::Float32;
  DType target_dtype = DType::UInt8;
  Address logits, targets, sums;
  Reduction reduction = Reduction::None;
  double avg_factor = 0.0;
  Address grad_out, grad_logits;
};

// iou[i] = |x > threshold AND t| / max(|x > threshold OR t|, 1); NaN when a logit is NaN or a float
// target is outside [0, 1].
struct MaskIoU {
  int64_t n = 0;
  int64_t m = 0;
  DType dtype = DType::Float32;
  DType target_dtype = DType::UInt8;
  Address logits, targets;
  double threshold = 0.0;
  Address iou;
};

// The CPU forward and IoU return the number of masks with float targets outside [0, 1].
int64_t mask_loss_forward_cpu(const MaskLossForward& args, int num_threads);
void mask_loss_backward_cpu(const MaskLossBackward& args, int num_threads);
int64_t mask_iou_cpu(const MaskIoU& args, int num_threads);

// Tests only: use the portable loops even where AVX2 + FMA are available.
void mask_loss_cpu_force_generic(bool on);

#if PYFAST_WITH_CUDA
// Bytes of scratch memory each entry point needs.
int64_t mask_loss_forward_cuda_workspace(const MaskLossForward& args);
int64_t mask_loss_backward_cuda_workspace(const MaskLossBackward& args);
int64_t mask_iou_cuda_workspace(const MaskIoU& args);
void mask_loss_forward_cuda(const MaskLossForward& args, const CudaLaunch& launch);
void mask_loss_backward_cuda(const MaskLossBackward& args, const CudaLaunch& launch);
void mask_iou_cuda(const MaskIoU& args, const CudaLaunch& launch);
#endif

}  // namespace pyfast
