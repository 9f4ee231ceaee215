"""pyfast.mask_loss and pyfast.mask_iou: the fused BCE + dice + focal mask loss.

Layering as in box_loss: the public functions check and normalize their arguments, then call an
autograd.Function whose forward and backward are the torch.library ops `pyfast::mask_loss_forward`
and `pyfast::mask_loss_backward`. The forward returns the loss and five sums per mask (the only
thing saved besides the inputs); the backward recomputes the per-element terms from the inputs.

Targets: bool and uint8 masks go to the kernels as bytes (a quarter of float32's traffic) and
are binary, any non-zero byte being foreground. Float (soft) targets are read in their own dtype
when it is the logits' dtype, or float32 with half/bfloat16 logits; any other float dtype is
converted to the logits' accumulation dtype (float32, float64 for float64 logits) first.
Gradients flow to the logits only: targets that require grad are rejected (detach them).
"""

from __future__ import annotations

import math

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

# Must match csrc/mask_loss/mask_loss_math.h.
_NO_FOCAL, _FOCAL_GAMMA2, _FOCAL_GENERAL = 0, 1, 2
_TARGET_UINT8 = 4
_NUM_SUMS = 5
_FLOAT_TARGETS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

LIB.define(
    "mask_loss_forward(Tensor logits, Tensor targets, float bce_weight, float dice_weight, float focal_weight, "
    "float alpha, float gamma, float smooth, int reduction, float? avg_factor) -> (Tensor, Tensor)"
)
LIB.define(
    "mask_loss_backward(Tensor grad, Tensor logits, Tensor targets, Tensor sums, float bce_weight, "
    "float dice_weight, float focal_weight, float alpha, float gamma, float smooth, int reduction, "
    "float? avg_factor) -> Tensor"
)
LIB.define("mask_iou(Tensor logits, Tensor targets, float threshold) -> Tensor")


def _check_masks(logits, targets) -> tuple[int, int]:
    """Everything a pointer needs before it crosses into C++; returns (N, M)."""
    check_float_tensor("logits", logits)
    check_tensor("targets", targets)
    if logits.dim() == 0:
        raise ValueError("logits must have shape (N, ...) with N masks, got a 0-d tensor")
    if targets.shape != logits.shape:
        raise ValueError(f"targets must have the shape of logits {tuple(logits.shape)}, got {tuple(targets.shape)}")
    if targets.dtype not in (torch.bool, torch.uint8) + _FLOAT_TARGETS:
        raise TypeError(f"targets must be bool, uint8 or a float dtype, got {targets.dtype}")
    check_same_device("targets", targets, "logits", logits)
    n, m = logits.shape[0], math.prod(logits.shape[1:])
    if n > 0 and m == 0:
        raise ValueError(f"logits must have at least one element per mask, got shape {tuple(logits.shape)}")
    return n, m


def _kernel_targets(targets: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """Targets as the kernels read them, and their type code."""
    if targets.dtype == torch.bool:
        return targets.contiguous().view(torch.uint8), _TARGET_UINT8
    if targets.dtype == torch.uint8:
        return targets.contiguous(), _TARGET_UINT8
    if targets.dtype == dtype or (targets.dtype == torch.float32 and dtype in (torch.float16, torch.bfloat16)):
        return targets.contiguous(), _native.DTYPE_CODES[targets.dtype]
    acc = acc_dtype(dtype)
    return targets.to(acc).contiguous(), _native.DTYPE_CODES[acc]


def _focal_mode(focal_weight: float, gamma: float) -> int:
    if focal_weight == 0.0:
        return _NO_FOCAL
    return _FOCAL_GAMMA2 if gamma == 2.0 else _FOCAL_GENERAL



def _kernel_args(logits, targets, bce_weight, dice_weight, focal_weight, alpha, gamma, smooth):
    n, m = _check_masks(logits, targets)
    logits = logits.contiguous()
    targets, target_code = _kernel_targets(targets, logits.dtype)
    args = (
        n, m, _native.DTYPE_CODES[logits.dtype], target_code, _focal_mode(focal_weight, gamma),
        bce_weight, dice_weight, focal_weight, alpha, gamma, smooth,
    )  # fmt: skip
    return logits, targets, args


def _workspace(n: int, m: int, logits: torch.Tensor) -> torch.Tensor:
    size = _native._C.mask_loss_cuda_workspace(n, m)
    return torch.empty(size, dtype=acc_dtype(logits.dtype), device=logits.device)


@impl_cpu_cuda("mask_loss_forward")
def _mask_loss_forward(
    logits, targets, bce_weight, dice_weight, focal_weight, alpha, gamma, smooth, reduction, avg_factor
):
    logits, targets, args = _kernel_args(logits, targets, bce_weight, dice_weight, focal_weight, alpha, gamma, smooth)
    n, m = args[0], args[1]
    acc = acc_dtype(logits.dtype)
    reduce = reduction != REDUCTIONS["none"]
    out = logits.new_empty(() if reduce else (n,), dtype=acc)
    sums = logits.new_empty((n, _NUM_SUMS), dtype=acc)
    ptrs = (logits.data_ptr(), targets.data_ptr(), sums.data_ptr(), out.data_ptr())
    scale = mean_scale(n, reduction, avg_factor)
    if logits.is_cuda:
        workspace = _workspace(n, m, logits)
        with torch.cuda.device(logits.device):
            _native._C.mask_loss_forward_cuda(
                *args, *ptrs, reduce, scale, workspace.data_ptr(), _native.cuda_stream(logits.device)
            )
    else:
        _native._C.mask_loss_forward_cpu(*args, *ptrs, reduce, scale, _native.num_threads())
    return out, sums


@impl_cpu_cuda("mask_loss_backward")
def _mask_loss_backward(
    grad, logits, targets, sums, bce_weight, dice_weight, focal_weight, alpha, gamma, smooth, reduction, avg_factor
):
    shape = logits.shape
    logits, targets, args = _kernel_args(logits, targets, bce_weight, dice_weight, focal_weight, alpha, gamma, smooth)
    n, m = args[0], args[1]
    acc = acc_dtype(logits.dtype)
    grad = grad.to(device=logits.device, dtype=acc).contiguous()
    grad_is_scalar = reduction != REDUCTIONS["none"]
    if grad.numel() != (1 if grad_is_scalar else n):
        raise ValueError(f"grad must have {1 if grad_is_scalar else n} elements, got {grad.numel()}")
    if sums.shape != (n, _NUM_SUMS) or sums.dtype != acc:
        raise ValueError(f"sums must be a ({n}, {_NUM_SUMS}) {acc} tensor, got {tuple(sums.shape)} {sums.dtype}")
    check_same_device("sums", sums, "logits", logits)
    sums = sums.contiguous()
    grad_logits = torch.empty(shape, dtype=logits.dtype, device=logits.device)
    ptrs = (
        grad.data_ptr(), grad_is_scalar, mean_scale(n, reduction, avg_factor),
        logits.data_ptr(), targets.data_ptr(), sums.data_ptr(), grad_logits.data_ptr(),
    )  # fmt: skip
    if logits.is_cuda:
        workspace = _workspace(n, m, logits)
        with torch.cuda.device(logits.device):
            _native._C.mask_loss_backward_cuda(
                *args, *ptrs, workspace.data_ptr(), _native.cuda_stream(logits.device)
            )
    else:
        _native._C.mask_loss_backward_cpu(*args, *ptrs, _native.num_threads())
    return grad_logits


@impl_cpu_cuda("mask_iou")
def _mask_iou(logits, targets, threshold):
    logits, targets, args = _kernel_args(logits, targets, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    n, m = args[0], args[1]
    iou = logits.new_empty((n,), dtype=acc_dtype(logits.dtype))
    if logits.is_cuda:
        workspace = _workspace(n, m, logits)
        with torch.cuda.device(logits.device):
            _native._C.mask_iou_cuda(
                n, m, args[2], args[3], threshold, logits.data_ptr(), targets.data_ptr(), iou.data_ptr(),
                workspace.data_ptr(), _native.cuda_stream(logits.device),
            )  # fmt: skip
    else:
        _native._C.mask_iou_cpu(
            n, m, args[2], args[3], threshold, logits.data_ptr(), targets.data_ptr(), iou.data_ptr(),
            _native.num_threads(),
        )  # fmt: skip
    return iou


@torch.library.register_fake("pyfast::mask_loss_forward")
def _mask_loss_forward_fake(
    logits, targets, bce_weight, dice_weight, focal_weight, alpha, gamma, smooth, reduction, avg_factor
):
    acc = acc_dtype(logits.dtype)
    n = logits.shape[0]
    out = logits.new_empty(() if reduction != REDUCTIONS["none"] else (n,), dtype=acc)
    return out, logits.new_empty((n, _NUM_SUMS), dtype=acc)


@torch.library.register_fake("pyfast::mask_loss_backward")
def _mask_loss_backward_fake(
    grad, logits, targets, sums, bce_weight, dice_weight, focal_weight, alpha, gamma, smooth, reduction, avg_factor
):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@torch.library.register_fake("pyfast::mask_iou")
def _mask_iou_fake(logits, targets, threshold):
    return logits.new_empty((logits.shape[0],), dtype=acc_dtype(logits.dtype))


class _MaskLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, bce_weight, dice_weight, focal_weight, alpha, gamma, smooth, reduction, avg_factor):
        params = (bce_weight, dice_weight, focal_weight, alpha, gamma, smooth, reduction, avg_factor)
        loss, sums = torch.ops.pyfast.mask_loss_forward(logits, targets, *params)
        ctx.save_for_backward(logits, targets, sums)
        ctx.params = params
        return loss

    @staticmethod
    def backward(ctx, grad):
        logits, targets, sums = ctx.saved_tensors
        grad_logits = None
        if ctx.needs_input_grad[0]:
            grad_logits = torch.ops.pyfast.mask_loss_backward(grad, logits, targets, sums, *ctx.params)
        return (grad_logits,) + (None,) * 9


def _check_targets_grad(targets: torch.Tensor) -> None:
    if targets.requires_grad:
        raise ValueError(
            "targets requires grad, but mask_loss differentiates with respect to logits only; "
            "pass targets.detach()"
        )


def mask_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    bce_weight: float = 1.0,
    dice_weight: float = 1.0,
    focal_weight: float = 0.0,
    alpha: float = 0.25,
    gamma: float = 2.0,
    smooth: float = 1.0,
    reduction: str = "mean",
    avg_factor=None,
) -> torch.Tensor:
    """Fused BCE + dice + focal loss of N masks; see DESIGN.md for the exact contract.

    logits: (N, ...) float16/bfloat16/float32/float64; targets: the same shape, bool/uint8
    (binary: non-zero is foreground) or float in [0, 1] (soft). Each mask's M elements give
    loss_i = bce_weight * mean(ce) + dice_weight * dice + focal_weight * mean(focal), with alpha < 0
    disabling the focal class weighting. reduction: none -> (N,), sum, or mean = sum / (avg_factor
    or N). The loss is float32 for half logits (float64 for float64); the gradient comes back in
    the logits' dtype. A NaN logit gives a NaN loss.
    """
    _check_masks(logits, targets)
    _check_targets_grad(targets)
    bce_weight = check_number("bce_weight", bce_weight)
    dice_weight = check_number("dice_weight", dice_weight)
    focal_weight = check_number("focal_weight", focal_weight)
    alpha = check_number("alpha", alpha)
    if alpha > 1.0:
        raise ValueError(f"alpha must be in [0, 1] (or negative to disable it), got {alpha}")
    gamma = check_number("gamma", gamma, minimum=0.0)
    smooth = check_number("smooth", smooth, positive=True)
    reduction_code = REDUCTIONS[check_choice("reduction", reduction, REDUCTIONS)]
    avg_factor = check_avg_factor(avg_factor)

    if not _native.use_native(logits.device.type):
        return reference.mask_loss_reference(
            logits, targets, bce_weight=bce_weight, dice_weight=dice_weight, focal_weight=focal_weight,
            alpha=alpha, gamma=gamma, smooth=smooth, reduction=reduction, avg_factor=avg_factor,
        )  # fmt: skip
    # Convert float targets once here rather than in both the forward and the backward op.
    kernel_targets, _ = _kernel_targets(targets, logits.dtype)
    # A tensor avg_factor divides on the device afterwards: no .item(), no host sync.
    tensor_divisor = avg_factor if isinstance(avg_factor, torch.Tensor) else None
    if tensor_divisor is not None and reduction_code == REDUCTIONS["mean"]:
        reduction_code, avg_factor = REDUCTIONS["sum"], None
    loss = _MaskLossFunction.apply(
        logits.contiguous(), kernel_targets, bce_weight, dice_weight, focal_weight, alpha, gamma, smooth,
        reduction_code, avg_factor,
    )  # fmt: skip
    if tensor_divisor is not None and reduction == "mean":
        loss = loss / tensor_divisor
    return loss


def mask_iou(logits: torch.Tensor, targets: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """IoU (N,) of each mask's prediction `logits > threshold` with its target (no gradient).

    |x > threshold AND t| / max(|x > threshold OR t|, 1); soft targets use the fuzzy (min/max)
    intersection and union. NaN when a mask has a NaN logit. float32 (float64 for float64 logits).
    """
    _check_masks(logits, targets)
    threshold = check_number("threshold", threshold)
    if not _native.use_native(logits.device.type):
        return reference.mask_iou_reference(logits, targets, threshold)
    with torch.no_grad():
        return torch.ops.pyfast.mask_iou(logits.detach(), targets.detach(), threshold)
