// Fused L1 + IoU-family box loss: the entry points behind pyfast.box_loss and pyfast.box_iou.
//
// Addresses are validated by pyfast/ops/box_loss.py. `pred`, `target` (and the gradients of both)
// hold n x 4 elements of `dtype`; `weight`, `grad_weight`, `out` and `grad_out` are in the
// accumulation type (float64 for float64 boxes, float32 otherwise).
#pragma once

#include <cstdint>

#include "common/op_args.h"
#include "common/types.h"

namespace pyfast {
namespace box {

enum Mode : int { kIoU = 0, kGIoU = 1, kDIoU = 2, kCIoU = 3 };
enum Format : int { kXYXY = 0, kCXCYWH = 1 };
enum Output : int { kLoss = 0, kVariant = 1 };
// No weight, one per box (n,), or one per coordinate (n, 4) as mmdet's bbox weights: each
// coordinate's |p_k - t_k| of the L1 term gets its own weight and the IoU term their mean.
enum Weight : int { kNoWeight = 0, kPerBox = 1, kPerCoordinate = 2 };

}  // namespace box

// The op's options: the keyword arguments of pyfast.box_loss that shape the per-box math.
struct BoxLossOptions {
  box::Mode mode = box::kGIoU;
  box::Format box_format = box::kXYXY;
  double l1_weight = 1.0;
  double iou_weight = 1.0;
  double eps = 1e-7;
};

// Forward. output == kLoss: with a reduction, out[0] = scale * sum_i weighted loss_i (scale from
// reduction_scale); without, out[i] = weighted loss_i. output == kVariant: out[i] = the IoU variant
// (no weight, no reduction).
//
// grad_pred (and grad_target) not null, CPU only, kLoss with a reduction: the same pass also writes
// d out[0] / d pred (and d out[0] / d target), the backward for grad_out = 1, with each block's
// boxes still in cache: the inputs are read from memory once per training step instead of twice.
struct BoxLossForward {
  BoxLossOptions options;
  int64_t n = 0;
  DType dtype = DType::Float32;
  Address pred, target;
  box::Weight weight_kind = box::kNoWeight;
  Address weight;
  box::Output output = box::kLoss;
  Reduction reduction = Reduction::None;
  double avg_factor = 0.0;  // <= 0: none
  Address out;
  Address grad_pred, grad_target;
};

// Backward of kLoss: grad_pred (and grad_target, grad_weight where not null) from grad_out (one
// value with a reduction, n without).
struct BoxLossBackward {
  BoxLossOptions options;
  int64_t n = 0;
  DType dtype = DType::Float32;
  Address pred, target;
  box::Weight weight_kind = box::kNoWeight;
  Address weight;
  Reduction reduction = Reduction::None;
  double avg_factor = 0.0;
  Address grad_out;
  Address grad_pred, grad_target, grad_weight;
};

void box_loss_forward_cpu(const BoxLossForward& args, int num_threads);
void box_loss_backward_cpu(const BoxLossBackward& args, int num_threads);

#if PYFAST_WITH_CUDA
// Bytes of scratch memory box_loss_forward_cuda needs.
int64_t box_loss_forward_cuda_workspace(const BoxLossForward& args);
void box_loss_forward_cuda(const BoxLossForward& args, const CudaLaunch& launch);
void box_loss_backward_cuda(const BoxLossBackward& args, const CudaLaunch& launch);
#endif

}  // namespace pyfast
