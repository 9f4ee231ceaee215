"""pyfast.mask_loss, pyfast.mask_iou and pyfast.MaskLoss: the fused BCE + dice + focal mask loss.

Four torch.library ops, written as every pyfast op is (pyfast/ops/_library.py):

    pyfast::mask_loss_forward(logits, targets, <options>, reduction, avg_factor) -> (loss, sums)
    pyfast::mask_loss_backward(grad, logits, targets, sums, <options>, reduction, avg_factor) -> grad_logits
    pyfast::mask_loss_forward_with_grad(logits, targets, <options>, reduction, avg_factor) -> (loss, grad_logits)
    pyfast::mask_iou(logits, targets, threshold) -> iou          (no gradient)

<options> (MASK_OPTIONS) pass through by name into pyfast._C's MaskLossOptions. The forward returns
the loss and a few sums per mask (the only thing saved besides the inputs); the backward recomputes
the per-element terms from the inputs. On the CPU, a reduced float32 loss without the focal term
whose logits require grad goes through mask_loss_forward_with_grad instead: the kernel gives each
mask two passes while it is in cache (its sums, then its gradient from the sigmoids the first pass
kept), so no exp is computed twice, and the backward hands the gradient over for grad_out = 1 (as
pyfast/ops/box_loss.py's op of the same kind does).

Targets: bool and uint8 masks go to the kernels as bytes (a quarter of float32's traffic) and are
binary, any non-zero byte being foreground. Float (soft) targets are probabilities in [0, 1], read in
their own dtype when it is the logits' dtype, or float32 with half/bfloat16 logits; any other float
dtype is converted to the logits' accumulation dtype first. A float target outside [0, 1] (a 0/255
mask passed as float, a negative value) gives no valid loss: the CPU ops raise (the kernels count
such targets for free); the CUDA ops give those masks a NaN loss and IoU, and raise too under
PYFAST_CHECKED=1 (which costs a host sync). Gradients flow to the logits only: targets that require
grad are rejected (detach them).
"""

from __future__ import annotations

import math

import torch

from pyfast import _native
from pyfast.ops import _buffers, reference
from pyfast.ops._checks import (
    acc_dtype,
    check_float_tensor,
    check_number,
    check_reduced,
    check_same_device,
    check_tensor,
    divide_by_avg_factor,
    reduction_args,
)
from pyfast.ops._library import (
    autograd_below_autograd,
    caller,
    define,
    first_order_only,
    for_upstream_gradient,
    register_autograd,
)

MASK_OPTIONS = "float bce_weight, float dice_weight, float focal_weight, float alpha, float gamma, float smooth"
REDUCTION = "str reduction, float? avg_factor"
NUM_SUMS = len(reference.MASK_SUMS)
_BAD_TARGETS = reference.MASK_SUMS.index("bad_targets")
_FLOAT_TARGETS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ---- checks and conversions shared by the kernels and the fakes ----


def _check_masks(logits, targets) -> tuple[int, int]:
    """Everything an address needs before it crosses into C++; returns (N, M)."""
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


def _read_as(targets: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Targets in a dtype the kernels read for `dtype` logits (bool stays bool: a free byte view)."""
    if targets.dtype in (torch.bool, torch.uint8) or targets.dtype == dtype:
        return targets
    if targets.dtype == torch.float32 and dtype in (torch.float16, torch.bfloat16):
        return targets
    return targets.to(acc_dtype(dtype))


def _kernel_targets(targets: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    targets = _read_as(targets, dtype).contiguous()
    return targets.view(torch.uint8) if targets.dtype == torch.bool else targets


def _check_target_range(targets: torch.Tensor, bad_masks: int | None, bad_per_mask) -> None:
    """Raises for float targets outside [0, 1]. bad_masks: how many masks have one where that is
    known for free (the CPU kernels count them), else None: on CUDA, counting is a host sync, done
    only under PYFAST_CHECKED=1 with bad_per_mask() (a per-mask count); those masks' loss and IoU
    are NaN either way."""
    if bad_masks is None:
        if not _native.checked():
            return
        bad_masks = int((bad_per_mask() > 0).sum())
    if bad_masks:
        low, high = (float(v) for v in targets.aminmax())
        raise ValueError(
            f"targets are float but outside [0, 1] (min {low:g}, max {high:g}) in {bad_masks} of "
            f"{targets.shape[0]} masks: float targets are probabilities. Pass a 0/1 or 0/255 mask as bool "
            "or uint8 (any non-zero byte is foreground), or divide it by 255."
        )


def _bad_per_mask(targets: torch.Tensor) -> torch.Tensor:
    return reference.bad_target_counts(targets.reshape(targets.shape[0], -1))


def _check_targets_with_torch(targets: torch.Tensor) -> None:
    """The reference kernels' range check, computed with torch (for free on CPU only)."""
    if not targets.is_floating_point():
        return
    on_cpu = targets.device.type == "cpu"
    bad_masks = int((_bad_per_mask(targets) > 0).sum()) if on_cpu else None
    _check_target_range(targets, bad_masks, lambda: _bad_per_mask(targets))


# ---- pyfast::mask_loss_forward ----


def _launch_forward(logits, targets, *, with_grad, reduction, avg_factor, **options):
    """The native forward kernel: (loss, sums, gradient). with_grad (the CPU only): the kernel also
    writes d loss / d logits for grad_out = 1, each mask's gradient while it is in cache where its
    fused loops cover the arguments and the backward kernel after the forward otherwise; else the
    gradient is None."""
    n, m = _check_masks(logits, targets)
    logits, targets = logits.contiguous(), _kernel_targets(targets, logits.dtype)
    acc = acc_dtype(logits.dtype)
    out = logits.new_empty(() if reduction != "none" else (n,), dtype=acc)
    sums = logits.new_empty((n, NUM_SUMS), dtype=acc)
    grad_logits = _buffers.empty_like(logits) if with_grad else None
    bad_masks = _native.launch(
        "mask_loss_forward", logits.device, options=options, n=n, m=m, dtype=_native.DTYPES[logits.dtype],
        target_dtype=_native.DTYPES[targets.dtype], logits=logits, targets=targets, reduction=reduction,
        avg_factor=avg_factor or 0.0, sums=sums, out=out, grad_logits=grad_logits,
    )  # fmt: skip
    _check_target_range(targets, bad_masks, lambda: sums[:, _BAD_TARGETS])
    return out, sums, grad_logits


def _forward_native(logits, targets, *, reduction, avg_factor, **options):
    out, sums, _ = _launch_forward(logits, targets, with_grad=False, reduction=reduction, avg_factor=avg_factor,
                                   **options)  # fmt: skip
    return out, sums


def _forward_reference(logits, targets, *, reduction, avg_factor, **options):
    _check_masks(logits, targets)
    sums = reference.mask_sums_reference(
        logits, targets, alpha=options["alpha"], gamma=options["gamma"], focal_weight=options["focal_weight"]
    ).to(acc_dtype(logits.dtype))
    _check_targets_with_torch(targets)
    loss = reference.mask_loss_reference(logits, targets, reduction=reduction, avg_factor=avg_factor, **options)
    return loss, sums


def _forward_fake(logits, targets, *, reduction, avg_factor, **options):
    n, _ = _check_masks(logits, targets)
    acc = acc_dtype(logits.dtype)
    return logits.new_empty(() if reduction != "none" else (n,), dtype=acc), logits.new_empty((n, NUM_SUMS), dtype=acc)


mask_loss_forward = define(
    f"mask_loss_forward(Tensor logits, Tensor targets, {MASK_OPTIONS}, {REDUCTION}) -> (Tensor, Tensor)",
    native=_forward_native, reference=_forward_reference, fake=_forward_fake,
)  # fmt: skip


# ---- pyfast::mask_loss_backward ----


def _check_backward(grad, logits, sums, n, reduction) -> None:
    expected = 1 if reduction != "none" else n
    if grad.numel() != expected:
        raise ValueError(f"grad must have {expected} elements, got {grad.numel()}")
    acc = acc_dtype(logits.dtype)
    if sums.shape != (n, NUM_SUMS) or sums.dtype != acc:
        raise ValueError(f"sums must be a ({n}, {NUM_SUMS}) {acc} tensor, got {tuple(sums.shape)} {sums.dtype}")
    check_same_device("sums", sums, "logits", logits)


def _backward_native(grad, logits, targets, sums, *, reduction, avg_factor, **options):
    n, m = _check_masks(logits, targets)
    _check_backward(grad, logits, sums, n, reduction)
    shape = logits.shape
    logits, targets = logits.contiguous(), _kernel_targets(targets, logits.dtype)
    grad = grad.to(device=logits.device, dtype=acc_dtype(logits.dtype)).contiguous()
    grad_logits = torch.empty(shape, dtype=logits.dtype, device=logits.device)
    _native.launch(
        "mask_loss_backward", logits.device, options=options, n=n, m=m, dtype=_native.DTYPES[logits.dtype],
        target_dtype=_native.DTYPES[targets.dtype], logits=logits, targets=targets, sums=sums.contiguous(),
        reduction=reduction, avg_factor=avg_factor or 0.0, grad_out=grad, grad_logits=grad_logits,
    )  # fmt: skip
    return grad_logits


def _backward_reference(grad, logits, targets, sums, *, reduction, avg_factor, **options):
    n, _ = _check_masks(logits, targets)
    _check_backward(grad, logits, sums, n, reduction)
    with torch.enable_grad():
        x = logits.detach().requires_grad_()
        loss = reference.mask_loss_reference(x, targets, reduction=reduction, avg_factor=avg_factor, **options)
        (grad_logits,) = torch.autograd.grad(loss, x, grad.reshape(loss.shape).to(loss.dtype))
    return grad_logits.to(logits.dtype)


def _backward_fake(grad, logits, targets, sums, *, reduction, avg_factor, **options):
    _check_masks(logits, targets)
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


mask_loss_backward = define(
    f"mask_loss_backward(Tensor grad, Tensor logits, Tensor targets, Tensor sums, {MASK_OPTIONS}, {REDUCTION})"
    " -> Tensor",
    native=_backward_native, reference=_backward_reference, fake=_backward_fake, differentiable=False,
)  # fmt: skip
_call_backward = caller(mask_loss_backward)


def _setup_targets(targets):
    if targets.requires_grad:
        raise ValueError(
            "targets requires grad, but mask_loss differentiates with respect to logits only; pass targets.detach()"
        )


def _setup_loss(ctx, inputs, output):
    logits, targets = inputs.pop("logits"), inputs.pop("targets")
    _setup_targets(targets)
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(logits, targets, output[1])
    ctx.options = inputs  # the options, the reduction and avg_factor, by name


def _backward_loss(ctx, grad, _grad_sums):
    logits, targets, sums = ctx.saved_tensors
    grad_logits = _call_backward(grad=grad, logits=logits, targets=targets, sums=sums, **ctx.options)
    grad_logits = first_order_only("mask_loss", grad_logits, grad, logits)
    return {"logits": grad_logits}


register_autograd(mask_loss_forward, _backward_loss, setup_context=_setup_loss)
_call_forward = caller(mask_loss_forward)


# ---- pyfast::mask_loss_forward_with_grad ----


def _with_grad_native(logits, targets, *, reduction, avg_factor, **options):
    check_reduced("mask_loss_forward_with_grad", reduction)
    if logits.device.type != "cpu":  # one kernel call computes both on the CPU only; elsewhere, two
        out, sums = _forward_native(logits, targets, reduction=reduction, avg_factor=avg_factor, **options)
        grad_logits = _backward_native(out.new_ones(()), logits, targets, sums, reduction=reduction,
                                       avg_factor=avg_factor, **options)  # fmt: skip
        return out, grad_logits
    out, _, grad_logits = _launch_forward(logits, targets, with_grad=True, reduction=reduction,
                                          avg_factor=avg_factor, **options)  # fmt: skip
    return out, grad_logits


def _with_grad_reference(logits, targets, *, reduction, avg_factor, **options):
    check_reduced("mask_loss_forward_with_grad", reduction)
    loss, sums = _forward_reference(logits, targets, reduction=reduction, avg_factor=avg_factor, **options)
    with autograd_below_autograd():
        grad_logits = _backward_reference(loss.new_ones(()), logits, targets, sums, reduction=reduction,
                                          avg_factor=avg_factor, **options)  # fmt: skip
    return loss, grad_logits


def _with_grad_fake(logits, targets, *, reduction, avg_factor, **options):
    check_reduced("mask_loss_forward_with_grad", reduction)
    _check_masks(logits, targets)
    grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    return logits.new_empty((), dtype=acc_dtype(logits.dtype)), grad_logits


mask_loss_forward_with_grad = define(
    f"mask_loss_forward_with_grad(Tensor logits, Tensor targets, {MASK_OPTIONS}, {REDUCTION}) -> (Tensor, Tensor)",
    native=_with_grad_native, reference=_with_grad_reference, fake=_with_grad_fake,
)  # fmt: skip


def _setup_with_grad(ctx, inputs, output):
    _setup_targets(inputs["targets"])
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zeros to fill for the gradient output's gradient
    # Saved, not kept as an attribute: autograd releases it after the backward (unless
    # retain_graph), so the gradient it returns can become logits.grad without a copy.
    ctx.save_for_backward(output[1], inputs["logits"])


def _backward_with_grad(ctx, grad, _grad_grad):
    grad_logits, logits = ctx.saved_tensors
    if grad is None:  # not materialized: the loss took no part in what was differentiated
        return {}
    (grad_logits,) = for_upstream_gradient([grad_logits], grad)
    return {"logits": first_order_only("mask_loss", grad_logits, grad, logits)}


register_autograd(mask_loss_forward_with_grad, _backward_with_grad, setup_context=_setup_with_grad)
_call_forward_with_grad = caller(mask_loss_forward_with_grad)


# ---- pyfast::mask_iou ----


def _iou_native(logits, targets, *, threshold):
    n, m = _check_masks(logits, targets)
    logits, targets = logits.contiguous(), _kernel_targets(targets, logits.dtype)
    iou = logits.new_empty((n,), dtype=acc_dtype(logits.dtype))
    bad_masks = _native.launch(
        "mask_iou", logits.device, n=n, m=m, dtype=_native.DTYPES[logits.dtype],
        target_dtype=_native.DTYPES[targets.dtype], logits=logits, targets=targets, threshold=threshold, iou=iou,
    )  # fmt: skip
    _check_target_range(targets, bad_masks, lambda: _bad_per_mask(targets))
    return iou


def _iou_reference(logits, targets, *, threshold):
    _check_masks(logits, targets)
    _check_targets_with_torch(targets)
    return reference.mask_iou_reference(logits, targets, threshold)


def _iou_fake(logits, targets, *, threshold):
    n, _ = _check_masks(logits, targets)
    return logits.new_empty((n,), dtype=acc_dtype(logits.dtype))


mask_iou_op = define(
    "mask_iou(Tensor logits, Tensor targets, float threshold) -> Tensor",
    native=_iou_native, reference=_iou_reference, fake=_iou_fake, differentiable=False,
)  # fmt: skip
_call_iou = caller(mask_iou_op)


# ---- the public functions ----


def _check_options(bce_weight, dice_weight, focal_weight, alpha, gamma, smooth) -> dict:
    alpha = check_number("alpha", alpha)
    if alpha > 1.0:
        raise ValueError(f"alpha must be in [0, 1] (or negative to disable it), got {alpha}")
    return dict(
        bce_weight=check_number("bce_weight", bce_weight), dice_weight=check_number("dice_weight", dice_weight),
        focal_weight=check_number("focal_weight", focal_weight), alpha=alpha,
        gamma=check_number("gamma", gamma, minimum=0.0), smooth=check_number("smooth", smooth, positive=True),
    )  # fmt: skip


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
    """Fused BCE + dice + focal loss of N masks.

    logits: (N, ...) float16/bfloat16/float32/float64; targets: the same shape, bool/uint8
    (binary: non-zero is foreground) or float in [0, 1] (soft). Each mask's M elements give
    loss_i = bce_weight * mean(ce) + dice_weight * dice + focal_weight * mean(focal), with alpha < 0
    disabling the focal class weighting. reduction: none -> (N,), sum, or mean = sum / (avg_factor
    or N); avg_factor (a number > 0 or a one-element tensor) is for "mean" only. The loss is float32
    for half logits (float64 for float64); the gradient comes back in the logits' dtype. A NaN logit
    gives a NaN loss; float targets outside [0, 1] raise (NaN for those masks on CUDA, see the module).
    """
    check_float_tensor("logits", logits)
    check_tensor("targets", targets)
    if targets.requires_grad:
        raise ValueError(
            "targets requires grad, but mask_loss differentiates with respect to logits only; pass targets.detach()"
        )
    options = _check_options(bce_weight, dice_weight, focal_weight, alpha, gamma, smooth)
    reduction, avg_factor, divisor = reduction_args(reduction, avg_factor)
    # Float targets in another dtype are converted once here, not in both the forward and the backward.
    if targets.dtype in _FLOAT_TARGETS:
        targets = _read_as(targets, logits.dtype)
    if _gradient_in_forward(logits, targets, options, reduction):
        loss, _ = _call_forward_with_grad(logits=logits, targets=targets, **options, reduction=reduction,
                                          avg_factor=avg_factor)  # fmt: skip
    else:
        loss, _ = _call_forward(logits=logits, targets=targets, **options, reduction=reduction, avg_factor=avg_factor)
    return loss if divisor is None else divide_by_avg_factor(loss, divisor)


def _gradient_in_forward(logits, targets, options, reduction) -> bool:
    """Whether mask_loss takes mask_loss_forward_with_grad (module docstring): a reduced loss on the
    CPU that will be differentiated, with the native kernels, in the case they fuse (float32 logits,
    binary or float32 targets, no focal term, masks of at most kMaskCpuMaxGradientInForward elements)."""
    return (
        reduction != "none" and logits.requires_grad and torch.is_grad_enabled() and logits.device.type == "cpu"
        and logits.dtype == torch.float32 and targets.dtype in (torch.bool, torch.uint8, torch.float32)
        and options["focal_weight"] == 0.0 and _native.use_native("cpu")
        and _fits_gradient_in_forward(logits.shape[0], math.prod(logits.shape[1:]))
    )  # fmt: skip


def _fits_gradient_in_forward(n: int, m: int) -> bool:
    """Masks small enough to stay in cache between their two passes, and enough work for every
    thread: a mask over one chunk (16,384 elements) is one thread's (the two kernels split it). The
    limits are the kernels' own, read from pyfast._C (present: the caller checked use_native)."""
    limit, chunk = _native._C.mask_cpu_max_gradient_in_forward, _native._C.mask_cpu_chunk
    return m <= limit and (m <= chunk or n >= torch.get_num_threads())


def mask_iou(logits: torch.Tensor, targets: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """IoU (N,) of each mask's prediction `logits > threshold` with its target (no gradient).

    |x > threshold AND t| / max(|x > threshold OR t|, 1); soft targets use the fuzzy (min/max)
    intersection and union. NaN when a mask has a NaN logit; float targets outside [0, 1] raise
    (NaN for those masks on CUDA). float32 (float64 for float64 logits).
    """
    check_float_tensor("logits", logits)
    check_tensor("targets", targets)
    threshold = check_number("threshold", threshold)
    with torch.no_grad():
        return _call_iou(logits=logits.detach(), targets=targets.detach(), threshold=threshold)


class MaskLoss(torch.nn.Module):
    """pyfast.mask_loss as a module: the options at construction, then
    `loss_fn(logits, targets, weight=None, avg_factor=None)`.

    weight: optional (N,) per-mask weights, applied to the per-mask losses before the reduction
    (mmdet's convention for a loss module's `weight`).
    """

    def __init__(
        self,
        bce_weight: float = 1.0,
        dice_weight: float = 1.0,
        focal_weight: float = 0.0,
        alpha: float = 0.25,
        gamma: float = 2.0,
        smooth: float = 1.0,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        self.options = _check_options(bce_weight, dice_weight, focal_weight, alpha, gamma, smooth)
        self.reduction = reduction_args(reduction, None)[0]

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None = None,
                avg_factor=None) -> torch.Tensor:  # fmt: skip
        if weight is None:
            return mask_loss(logits, targets, reduction=self.reduction, avg_factor=avg_factor, **self.options)
        check_float_tensor("weight", weight)
        if weight.shape != logits.shape[:1]:
            raise ValueError(f"weight must have shape ({logits.shape[0]},), got {tuple(weight.shape)}")
        per_mask = mask_loss(logits, targets, reduction="none", **self.options) * weight
        reduction, number, divisor = reduction_args(self.reduction, avg_factor)
        if reduction == "none":
            return per_mask
        if divisor is not None:
            return divide_by_avg_factor(per_mask.sum(), divisor)
        if reduction == "sum":
            return per_mask.sum()
        return per_mask.sum() / (number if number is not None else max(per_mask.shape[0], 1))

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.options.items()) + f", reduction={self.reduction!r}"
