"""pyfast.box_loss and pyfast.box_iou: the fused L1 + IoU-family box loss.

Layering: the public functions check and normalize their arguments, then call an
autograd.Function whose forward and backward are the torch.library ops `pyfast::box_loss_forward`
and `pyfast::box_loss_backward` (each one native kernel per device). The backward recomputes from
the saved inputs; nothing per box is kept between the passes.
"""

from __future__ import annotations

import torch

from pyfast import _native
from pyfast.ops import reference
from pyfast.ops._checks import (
    REDUCTIONS,
    acc_dtype,
    check_avg_factor,
    check_choice,
    check_float_tensor,
    check_number,
    check_same_device,
    check_tensor,
    mean_scale,
)
from pyfast.ops._library import LIB, impl_cpu_cuda

# Must match csrc/box_loss/box_loss_math.h.
MODES = {"iou": 0, "giou": 1, "diou": 2, "ciou": 3}
FORMATS = {"xyxy": 0, "cxcywh": 1}
_OUTPUT_LOSS, _OUTPUT_VARIANT = 0, 1

LIB.define(
    "box_loss_forward(Tensor pred, Tensor target, Tensor? weight, int mode, int box_format, float l1_weight, "
    "float iou_weight, float eps, int reduction, float? avg_factor) -> Tensor"
)
LIB.define(
    "box_loss_backward(Tensor grad, Tensor pred, Tensor target, Tensor? weight, int mode, int box_format, "
    "float l1_weight, float iou_weight, float eps, int reduction, float? avg_factor, bool target_grad, "
    "bool weight_grad) -> (Tensor, Tensor, Tensor)"
)
LIB.define("box_iou(Tensor pred, Tensor target, int mode, int box_format, float eps) -> Tensor")


def _check_boxes(pred, target, weight) -> None:
    """Everything a pointer needs before it crosses into C++ (also guards direct torch.ops calls)."""
    check_float_tensor("pred", pred)
    check_float_tensor("target", target)
    if pred.dim() != 2 or pred.shape[1] != 4:
        raise ValueError(f"pred must have shape (N, 4), got {tuple(pred.shape)}")
    if target.shape != pred.shape:
        raise ValueError(f"target must have the shape of pred {tuple(pred.shape)}, got {tuple(target.shape)}")
    if target.dtype != pred.dtype:
        raise TypeError(f"target dtype {target.dtype} differs from pred dtype {pred.dtype}")
    check_same_device("target", target, "pred", pred)
    if weight is not None:
        check_float_tensor("weight", weight)
        if weight.shape != pred.shape[:1]:
            raise ValueError(f"weight must have shape ({pred.shape[0]},), got {tuple(weight.shape)}")
        check_same_device("weight", weight, "pred", pred)



def _aligned_boxes(boxes: torch.Tensor) -> torch.Tensor:
    """Contiguous, and on CUDA aligned to one box (the kernels load a box as one vector)."""
    boxes = boxes.contiguous()
    if boxes.is_cuda and boxes.data_ptr() % (4 * boxes.element_size()):
        boxes = boxes.clone()  # a view starting mid-box, e.g. flat[1:].view(-1, 4)
    return boxes


def _kernel_inputs(pred, target, weight):
    _check_boxes(pred, target, weight)
    acc = acc_dtype(pred.dtype)
    if weight is not None:
        weight = weight.to(acc).contiguous()
    return _aligned_boxes(pred), _aligned_boxes(target), weight, acc


def _run_forward(pred, target, weight, mode, box_format, l1_weight, iou_weight, eps, output, reduction, avg_factor):
    pred, target, weight, acc = _kernel_inputs(pred, target, weight)
    n = pred.shape[0]
    reduce = reduction != REDUCTIONS["none"]
    out = pred.new_empty(() if reduce else (n,), dtype=acc)
    args = (n, _native.DTYPE_CODES[pred.dtype], mode, box_format, l1_weight, iou_weight, eps)
    ptrs = (pred.data_ptr(), target.data_ptr(), 0 if weight is None else weight.data_ptr(), out.data_ptr())
    scale = mean_scale(n, reduction, avg_factor)
    if pred.is_cuda:
        workspace = torch.empty(_native._C.box_loss_cuda_workspace(n) if reduce else 0, dtype=acc, device=pred.device)
        with torch.cuda.device(pred.device):
            _native._C.box_loss_forward_cuda(
                *args, *ptrs, output, reduce, scale, workspace.data_ptr(), _native.cuda_stream(pred.device)
            )
    else:
        _native._C.box_loss_forward_cpu(*args, *ptrs, output, reduce, scale, _native.num_threads())
    return out


@impl_cpu_cuda("box_loss_forward")
def _box_loss_forward(pred, target, weight, mode, box_format, l1_weight, iou_weight, eps, reduction, avg_factor):
    return _run_forward(
        pred, target, weight, mode, box_format, l1_weight, iou_weight, eps, _OUTPUT_LOSS, reduction, avg_factor
    )


@impl_cpu_cuda("box_iou")
def _box_iou(pred, target, mode, box_format, eps):
    return _run_forward(pred, target, None, mode, box_format, 0.0, 0.0, eps, _OUTPUT_VARIANT, 0, None)


@impl_cpu_cuda("box_loss_backward")
def _box_loss_backward(
    grad, pred, target, weight, mode, box_format, l1_weight, iou_weight, eps, reduction, avg_factor, target_grad,
    weight_grad,
):
    pred, target, weight, acc = _kernel_inputs(pred, target, weight)
    n = pred.shape[0]
    grad = grad.to(device=pred.device, dtype=acc).contiguous()
    grad_is_scalar = reduction != REDUCTIONS["none"]
    if grad.numel() != (1 if grad_is_scalar else n):
        raise ValueError(f"grad must have {1 if grad_is_scalar else n} elements, got {grad.numel()}")
    grad_pred = torch.empty_like(pred)
    grad_target = torch.empty_like(target) if target_grad else pred.new_empty((0,))
    grad_weight = pred.new_empty((n,) if weight_grad else (0,), dtype=acc)
    args = (
        n, _native.DTYPE_CODES[pred.dtype], mode, box_format, l1_weight, iou_weight, eps,
        grad.data_ptr(), grad_is_scalar, mean_scale(n, reduction, avg_factor),
        pred.data_ptr(), target.data_ptr(), 0 if weight is None else weight.data_ptr(),
        grad_pred.data_ptr(), grad_target.data_ptr() if target_grad else 0,
        grad_weight.data_ptr() if weight_grad else 0,
    )  # fmt: skip
    if pred.is_cuda:
        with torch.cuda.device(pred.device):
            _native._C.box_loss_backward_cuda(*args, _native.cuda_stream(pred.device))
    else:
        _native._C.box_loss_backward_cpu(*args, _native.num_threads())
    return grad_pred, grad_target, grad_weight


@torch.library.register_fake("pyfast::box_loss_forward")
def _box_loss_forward_fake(pred, target, weight, mode, box_format, l1_weight, iou_weight, eps, reduction, avg_factor):
    shape = () if reduction != REDUCTIONS["none"] else (pred.shape[0],)
    return pred.new_empty(shape, dtype=acc_dtype(pred.dtype))


@torch.library.register_fake("pyfast::box_iou")
def _box_iou_fake(pred, target, mode, box_format, eps):
    return pred.new_empty((pred.shape[0],), dtype=acc_dtype(pred.dtype))


@torch.library.register_fake("pyfast::box_loss_backward")
def _box_loss_backward_fake(
    grad, pred, target, weight, mode, box_format, l1_weight, iou_weight, eps, reduction, avg_factor, target_grad,
    weight_grad,
):
    grad_target = torch.empty_like(target) if target_grad else pred.new_empty((0,))
    grad_weight = pred.new_empty((pred.shape[0],) if weight_grad else (0,), dtype=acc_dtype(pred.dtype))
    return torch.empty_like(pred), grad_target, grad_weight


class _BoxLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, target, weight, mode, box_format, l1_weight, iou_weight, eps, reduction, avg_factor):
        ctx.save_for_backward(pred, target, weight)
        ctx.params = (mode, box_format, l1_weight, iou_weight, eps, reduction, avg_factor)
        return torch.ops.pyfast.box_loss_forward(
            pred, target, weight, mode, box_format, l1_weight, iou_weight, eps, reduction, avg_factor
        )

    @staticmethod
    def backward(ctx, grad):
        pred, target, weight = ctx.saved_tensors
        target_grad, weight_grad = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_pred, grad_target, grad_weight = torch.ops.pyfast.box_loss_backward(
            grad, pred, target, weight, *ctx.params, target_grad, weight_grad
        )
        return (
            grad_pred if ctx.needs_input_grad[0] else None,
            grad_target if target_grad else None,
            grad_weight if weight_grad else None,
        ) + (None,) * 7


class _BoxIoUFunction(torch.autograd.Function):
    """The variant's gradient is the loss gradient with l1_weight=0, iou_weight=-1."""

    @staticmethod
    def forward(ctx, pred, target, mode, box_format, eps):
        ctx.save_for_backward(pred, target)
        ctx.params = (mode, box_format, eps)
        return torch.ops.pyfast.box_iou(pred, target, mode, box_format, eps)

    @staticmethod
    def backward(ctx, grad):
        pred, target = ctx.saved_tensors
        mode, box_format, eps = ctx.params
        grad_pred, grad_target, _ = torch.ops.pyfast.box_loss_backward(
            grad, pred, target, None, mode, box_format, 0.0, -1.0, eps, REDUCTIONS["none"], None,
            ctx.needs_input_grad[1], False,
        )  # fmt: skip
        return grad_pred, (grad_target if ctx.needs_input_grad[1] else None), None, None, None


def _promote(pred, target):
    """Both boxes in one float dtype (autocast leaves pred in half and target in float32)."""
    check_float_tensor("pred", pred)
    check_float_tensor("target", target)
    if pred.dtype != target.dtype:
        dtype = torch.promote_types(pred.dtype, target.dtype)
        pred, target = pred.to(dtype), target.to(dtype)
    return pred, target


def box_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    mode: str = "giou",
    box_format: str = "xyxy",
    l1_weight: float = 1.0,
    iou_weight: float = 1.0,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
    avg_factor=None,
    eps: float = 1e-7,
) -> torch.Tensor:
    """Fused L1 + (1 - IoU variant) loss of paired boxes; see DESIGN.md for the exact contract.

    pred, target: (N, 4) float tensors on one device. mode: iou|giou|diou|ciou. box_format:
    xyxy|cxcywh (the IoU term always works on xyxy; the L1 term on the given coordinates).
    weight: optional (N,) per-box weights. reduction: none -> (N,), sum, or mean = sum / (avg_factor
    or N). The loss is float32 for half inputs (float64 for float64); gradients come back in the
    input dtype. A NaN or Inf coordinate gives a NaN loss.
    """
    pred, target = _promote(pred, target)
    if weight is not None:
        check_tensor("weight", weight)
    _check_boxes(pred, target, weight)
    mode_code = MODES[check_choice("mode", mode, MODES)]
    format_code = FORMATS[check_choice("box_format", box_format, FORMATS)]
    reduction_code = REDUCTIONS[check_choice("reduction", reduction, REDUCTIONS)]
    l1_weight = check_number("l1_weight", l1_weight)
    iou_weight = check_number("iou_weight", iou_weight)
    eps = check_number("eps", eps, minimum=0.0)
    avg_factor = check_avg_factor(avg_factor)

    if not _native.use_native(pred.device.type):
        return reference.box_loss_reference(
            pred, target, mode=mode, box_format=box_format, l1_weight=l1_weight, iou_weight=iou_weight,
            weight=weight, reduction=reduction, avg_factor=avg_factor, eps=eps,
        )  # fmt: skip
    if weight is not None:
        weight = weight.to(acc_dtype(pred.dtype))
    # A tensor avg_factor divides on the device afterwards: no .item(), no host sync.
    tensor_divisor = avg_factor if isinstance(avg_factor, torch.Tensor) else None
    if tensor_divisor is not None and reduction_code == REDUCTIONS["mean"]:
        reduction_code, avg_factor = REDUCTIONS["sum"], None
    loss = _BoxLossFunction.apply(
        pred.contiguous(), target.contiguous(), weight, mode_code, format_code, l1_weight, iou_weight, eps,
        reduction_code, avg_factor,
    )  # fmt: skip
    if tensor_divisor is not None and reduction == "mean":
        loss = loss / tensor_divisor
    return loss


def box_iou(
    pred: torch.Tensor, target: torch.Tensor, *, mode: str = "iou", box_format: str = "xyxy", eps: float = 1e-7
) -> torch.Tensor:
    """Paired IoU variant (N,) of pred[i] and target[i]: iou, giou, diou or ciou (differentiable)."""
    pred, target = _promote(pred, target)
    _check_boxes(pred, target, None)
    mode_code = MODES[check_choice("mode", mode, MODES)]
    format_code = FORMATS[check_choice("box_format", box_format, FORMATS)]
    eps = check_number("eps", eps, minimum=0.0)
    if not _native.use_native(pred.device.type):
        return reference.box_iou_reference(pred, target, mode=mode, box_format=box_format, eps=eps)
    return _BoxIoUFunction.apply(pred.contiguous(), target.contiguous(), mode_code, format_code, eps)
