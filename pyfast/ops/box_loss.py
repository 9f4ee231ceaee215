"""pyfast.box_loss, pyfast.box_iou and pyfast.BoxLoss: the fused L1 + IoU-family box loss.

Three torch.library ops, each written as every pyfast op is (pyfast/ops/_library.py): a schema whose
arguments every caller passes by name, a native kernel that fills pyfast._C's argument struct by
name, the reference twin as the fallback, a fake, and autograd on the op itself:

    pyfast::box_loss_forward(pred, target, weight, <options>, reduction, avg_factor) -> loss
    pyfast::box_loss_backward(grad, pred, target, weight, target_grad, weight_grad, <options>,
                              reduction, avg_factor) -> [grad_pred, grad_target?, grad_weight?]
    pyfast::box_loss_forward_with_grad(pred, target, weight, target_grad, <options>, reduction, avg_factor)
        -> (loss, grad_pred, grad_target)
    pyfast::box_iou(pred, target, mode, box_format, eps) -> variant

<options> are the keyword arguments that shape the per-box math (BOX_OPTIONS). They pass through
the ops by name into pyfast._C's BoxLossOptions, so a new one is a named field there, in
BOX_OPTIONS, and in box_loss() and the reference twin.

Two ways to a gradient. box_loss_forward's backward recomputes from the saved inputs: nothing per
box is kept between the passes, and the boxes are read twice. On the CPU, for a reduced loss whose
pred requires grad, box_loss() calls box_loss_forward_with_grad instead: one pass computes the loss
and d loss / d pred (and target) with the boxes in cache, and the backward only scales the saved
gradient by grad_out (returns it as it is for grad_out = 1, loss.backward()'s case). That reads the
boxes once per step instead of twice, at the cost of holding the gradient from the forward to the
backward (the size of pred). It stays off CUDA, where the backward pass is no bottleneck and
checking grad_out == 1 would cost a host sync.
"""

from __future__ import annotations

import torch

from pyfast import _native
from pyfast._native import FLOAT_DTYPES
from pyfast.ops import _buffers, reference
from pyfast.ops._checks import (
    acc_dtype,
    check_choice,
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

MODES = reference.BOX_MODES
FORMATS = reference.BOX_FORMATS
BOX_OPTIONS = "str mode, str box_format, float l1_weight, float iou_weight, float eps"
REDUCTION = "str reduction, float? avg_factor"


# ---- checks shared by the kernels and the fakes: everything an address needs ----


def _check_boxes(pred, target, weight) -> None:
    if (
        weight is None
        and type(pred) is type(target) is torch.Tensor
        and pred.dtype is target.dtype
        and pred.dtype in FLOAT_DTYPES
        and pred.dim() == 2
        and pred.shape[1] == 4
        and pred.shape == target.shape
        and pred.device == target.device
    ):
        return  # the common case, in one expression; any failure goes through the checks below
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
        n = pred.shape[0]
        if weight.shape != (n,) and weight.shape != (n, 4):
            raise ValueError(f"weight must have shape ({n},) or ({n}, 4), got {tuple(weight.shape)}")
        check_same_device("weight", weight, "pred", pred)


def _weight_kind(weight) -> str:
    if weight is None:
        return "none"
    return "per_box" if weight.dim() == 1 else "per_coordinate"


def _aligned_boxes(boxes: torch.Tensor) -> torch.Tensor:
    """Contiguous, and on CUDA aligned to one box (the kernels load a box as one vector)."""
    boxes = boxes.contiguous()
    if boxes.is_cuda and boxes.data_ptr() % (4 * boxes.element_size()):
        boxes = boxes.clone()  # a view starting mid-box, e.g. flat[1:].view(-1, 4)
    return boxes


def _kernel_inputs(pred, target, weight):
    _check_boxes(pred, target, weight)
    if weight is not None:
        weight = weight.to(acc_dtype(pred.dtype)).contiguous()
    return _aligned_boxes(pred), _aligned_boxes(target), weight


# ---- pyfast::box_loss_forward ----


def _launch_forward(pred, target, weight, *, with_grad, target_grad, reduction, avg_factor, **options):
    """The native forward kernel: (loss, grad_pred, grad_target). with_grad (the CPU only): the
    kernel also writes d loss / d pred, and d loss / d target when target_grad, for grad_out = 1, in
    the same pass; the gradients not written are None."""
    pred, target, weight = _kernel_inputs(pred, target, weight)
    n = pred.shape[0]
    out = pred.new_empty(() if reduction != "none" else (n,), dtype=acc_dtype(pred.dtype))
    grad_pred = _buffers.empty_like(pred) if with_grad else None
    grad_target = _buffers.empty_like(target) if with_grad and target_grad else None
    _native.launch(
        "box_loss_forward", pred.device, options=options, n=n, dtype=_native.DTYPES[pred.dtype], pred=pred,
        target=target, weight_kind=_weight_kind(weight), weight=weight, output="loss", reduction=reduction,
        avg_factor=avg_factor or 0.0, out=out, grad_pred=grad_pred, grad_target=grad_target,
    )  # fmt: skip
    return out, grad_pred, grad_target


def _forward_native(pred, target, weight, *, reduction, avg_factor, **options):
    out, _, _ = _launch_forward(pred, target, weight, with_grad=False, target_grad=False, reduction=reduction,
                                avg_factor=avg_factor, **options)  # fmt: skip
    return out


def _forward_reference(pred, target, weight, *, reduction, avg_factor, **options):
    _check_boxes(pred, target, weight)
    return reference.box_loss_reference(pred, target, weight=weight, reduction=reduction, avg_factor=avg_factor,
                                        **options)


def _forward_fake(pred, target, weight, *, reduction, avg_factor, **options):
    _check_boxes(pred, target, weight)
    return pred.new_empty(() if reduction != "none" else (pred.shape[0],), dtype=acc_dtype(pred.dtype))


box_loss_forward = define(
    f"box_loss_forward(Tensor pred, Tensor target, Tensor? weight, {BOX_OPTIONS}, {REDUCTION}) -> Tensor",
    native=_forward_native, reference=_forward_reference, fake=_forward_fake,
)  # fmt: skip


# ---- pyfast::box_loss_backward ----


def _check_grad(grad, n, reduction):
    expected = 1 if reduction != "none" else n
    if grad.numel() != expected:
        raise ValueError(f"grad must have {expected} elements, got {grad.numel()}")


def _backward_native(grad, pred, target, weight, *, target_grad, weight_grad, reduction, avg_factor, **options):
    pred, target, weight = _kernel_inputs(pred, target, weight)
    n = pred.shape[0]
    _check_grad(grad, n, reduction)
    grad = grad.to(device=pred.device, dtype=acc_dtype(pred.dtype)).contiguous()
    grads = _wanted_grads(pred, target, weight, target_grad, weight_grad, _buffers.empty_like)
    _native.launch(
        "box_loss_backward", pred.device, options=options, n=n, dtype=_native.DTYPES[pred.dtype], pred=pred,
        target=target, weight_kind=_weight_kind(weight), weight=weight, reduction=reduction,
        avg_factor=avg_factor or 0.0, grad_out=grad, grad_pred=grads[0], grad_target=grads[1] if target_grad else None,
        grad_weight=grads[-1] if weight_grad and weight is not None else None,
    )  # fmt: skip
    return grads


def _wanted_grads(pred, target, weight, target_grad, weight_grad, empty_like=torch.empty_like) -> list[torch.Tensor]:
    """The backward's outputs, uninitialized: grad_pred, then grad_target and grad_weight where asked
    for (grad_weight only with a weight, in the accumulation dtype as the weight is). The kernel's
    come from _buffers.empty_like; the fake's, from torch.empty_like."""
    grads = [empty_like(pred)]
    if target_grad:
        grads.append(empty_like(target))
    if weight_grad and weight is not None:
        grads.append(weight.new_empty(weight.shape, dtype=acc_dtype(pred.dtype)))
    return grads


def _backward_reference(grad, pred, target, weight, *, target_grad, weight_grad, reduction, avg_factor, **options):
    _check_boxes(pred, target, weight)
    _check_grad(grad, pred.shape[0], reduction)
    with torch.enable_grad():
        p, t = pred.detach().requires_grad_(), target.detach().requires_grad_()
        w = weight.detach().requires_grad_() if weight is not None else None
        loss = reference.box_loss_reference(p, t, weight=w, reduction=reduction, avg_factor=avg_factor, **options)
        inputs = [x for x in (p, t, w) if x is not None]
        grads = torch.autograd.grad(loss, inputs, grad.reshape(loss.shape).to(loss.dtype), allow_unused=True)
    wanted = [grads[0].to(pred.dtype)]
    if target_grad:
        wanted.append(grads[1].to(target.dtype))
    if weight_grad and weight is not None:
        wanted.append(grads[2].to(acc_dtype(pred.dtype)))
    return wanted


def _backward_fake(grad, pred, target, weight, *, target_grad, weight_grad, reduction, avg_factor, **options):
    _check_boxes(pred, target, weight)
    return _wanted_grads(pred, target, weight, target_grad, weight_grad)


box_loss_backward = define(
    f"box_loss_backward(Tensor grad, Tensor pred, Tensor target, Tensor? weight, bool target_grad, "
    f"bool weight_grad, {BOX_OPTIONS}, {REDUCTION}) -> Tensor[]",
    native=_backward_native, reference=_backward_reference, fake=_backward_fake, differentiable=False,
)  # fmt: skip
_call_backward = caller(box_loss_backward)


def _setup_loss(ctx, inputs, output):
    ctx.save_for_backward(inputs.pop("pred"), inputs.pop("target"), inputs.pop("weight"))
    ctx.options = inputs  # the options, the reduction and avg_factor, by name


def _backward_loss(ctx, grad):
    pred, target, weight = ctx.saved_tensors
    target_grad, weight_grad = ctx.needs_grad["target"], ctx.needs_grad["weight"]
    grads = _call_backward(grad=grad, pred=pred, target=target, weight=weight, target_grad=target_grad,
                           weight_grad=weight_grad, **ctx.options)
    grads = first_order_only("box_loss", grads, grad, pred, target, weight)
    return {"pred": grads[0], "target": grads[1] if target_grad else None,
            "weight": grads[-1] if weight_grad and weight is not None else None}  # fmt: skip


register_autograd(box_loss_forward, _backward_loss, setup_context=_setup_loss)
_call_forward = caller(box_loss_forward)


# ---- pyfast::box_loss_forward_with_grad ----


def _no_target_grad(pred):
    return pred.new_empty((0, 4))  # the third output when target_grad is false


def _with_grad_native(pred, target, weight, *, target_grad, reduction, avg_factor, **options):
    check_reduced("box_loss_forward_with_grad", reduction)
    if pred.device.type != "cpu":  # one kernel computes both on the CPU only; elsewhere, two
        loss = _forward_native(pred, target, weight, reduction=reduction, avg_factor=avg_factor, **options)
        grads = _backward_native(loss.new_ones(()), pred, target, weight, target_grad=target_grad, weight_grad=False,
                                 reduction=reduction, avg_factor=avg_factor, **options)  # fmt: skip
        return loss, grads[0], grads[1] if target_grad else _no_target_grad(pred)
    out, grad_pred, grad_target = _launch_forward(pred, target, weight, with_grad=True, target_grad=target_grad,
                                                  reduction=reduction, avg_factor=avg_factor, **options)  # fmt: skip
    return out, grad_pred, grad_target if target_grad else _no_target_grad(pred)


def _with_grad_reference(pred, target, weight, *, target_grad, reduction, avg_factor, **options):
    check_reduced("box_loss_forward_with_grad", reduction)
    loss = _forward_reference(pred, target, weight, reduction=reduction, avg_factor=avg_factor, **options)
    with autograd_below_autograd():
        grads = _backward_reference(loss.new_ones(()), pred, target, weight, target_grad=target_grad,
                                    weight_grad=False, reduction=reduction, avg_factor=avg_factor, **options)  # fmt: skip
    return loss, grads[0], grads[1] if target_grad else _no_target_grad(pred)


def _with_grad_fake(pred, target, weight, *, target_grad, reduction, avg_factor, **options):
    check_reduced("box_loss_forward_with_grad", reduction)
    _check_boxes(pred, target, weight)
    grad_target = torch.empty_like(target) if target_grad else _no_target_grad(pred)
    return pred.new_empty((), dtype=acc_dtype(pred.dtype)), torch.empty_like(pred), grad_target


box_loss_forward_with_grad = define(
    f"box_loss_forward_with_grad(Tensor pred, Tensor target, Tensor? weight, bool target_grad, {BOX_OPTIONS}, "
    f"{REDUCTION}) -> (Tensor, Tensor, Tensor)",
    native=_with_grad_native, reference=_with_grad_reference, fake=_with_grad_fake,
)  # fmt: skip


def _setup_with_grad(ctx, inputs, output):
    if inputs["weight"] is not None and inputs["weight"].requires_grad:
        raise ValueError(
            "weight requires grad, but box_loss_forward_with_grad differentiates pred and target only; "
            "use box_loss_forward (pyfast.box_loss picks it for a weight that requires grad)"
        )
    _, grad_pred, grad_target = output
    ctx.mark_non_differentiable(grad_pred, grad_target)
    # The backward gets no gradient for those two outputs: None, not tensors of zeros to fill.
    ctx.set_materialize_grads(False)
    # Saved, not kept as attributes: autograd releases saved tensors after the backward (unless
    # retain_graph), so the gradient it returns can become pred.grad without a copy.
    ctx.save_for_backward(grad_pred, grad_target, inputs["pred"], inputs["target"], inputs["weight"])
    ctx.target_grad = inputs["target_grad"]


def _backward_with_grad(ctx, grad, _grad_pred, _grad_target):
    grad_pred, grad_target, pred, target, weight = ctx.saved_tensors
    if grad is None:  # not materialized: the loss itself took no part in what was differentiated
        return {}
    grads = for_upstream_gradient([grad_pred, grad_target] if ctx.target_grad else [grad_pred], grad)
    grads = first_order_only("box_loss", grads, grad, pred, target, weight)
    return {"pred": grads[0], "target": grads[1] if ctx.target_grad else None}


register_autograd(box_loss_forward_with_grad, _backward_with_grad, setup_context=_setup_with_grad)
_call_forward_with_grad = caller(box_loss_forward_with_grad)


# ---- pyfast::box_iou ----


def _iou_native(pred, target, *, mode, box_format, eps):
    pred, target, _ = _kernel_inputs(pred, target, None)
    out = pred.new_empty((pred.shape[0],), dtype=acc_dtype(pred.dtype))
    _native.launch(
        "box_loss_forward", pred.device, options=dict(mode=mode, box_format=box_format, l1_weight=0.0,
        iou_weight=0.0, eps=eps), n=pred.shape[0], dtype=_native.DTYPES[pred.dtype], pred=pred, target=target,
        weight_kind="none", weight=None, output="variant", reduction="none", avg_factor=0.0, out=out,
        grad_pred=None, grad_target=None,
    )  # fmt: skip
    return out


def _iou_reference(pred, target, *, mode, box_format, eps):
    _check_boxes(pred, target, None)
    return reference.box_iou_reference(pred, target, mode=mode, box_format=box_format, eps=eps)


def _iou_fake(pred, target, *, mode, box_format, eps):
    _check_boxes(pred, target, None)
    return pred.new_empty((pred.shape[0],), dtype=acc_dtype(pred.dtype))


box_iou_op = define(
    "box_iou(Tensor pred, Tensor target, str mode, str box_format, float eps) -> Tensor",
    native=_iou_native, reference=_iou_reference, fake=_iou_fake,
)  # fmt: skip


def _setup_iou(ctx, inputs, output):
    ctx.save_for_backward(inputs.pop("pred"), inputs.pop("target"))
    ctx.options = inputs  # mode, box_format, eps


def _backward_iou(ctx, grad):
    """The variant's gradient is the loss gradient with l1_weight=0, iou_weight=-1."""
    pred, target = ctx.saved_tensors
    target_grad = ctx.needs_grad["target"]
    grads = _call_backward(grad=grad, pred=pred, target=target, weight=None, target_grad=target_grad,
                           weight_grad=False, l1_weight=0.0, iou_weight=-1.0, reduction="none", avg_factor=None,
                           **ctx.options)  # fmt: skip
    grads = first_order_only("box_iou", grads, grad, pred, target)
    return {"pred": grads[0], "target": grads[1] if target_grad else None}


register_autograd(box_iou_op, _backward_iou, setup_context=_setup_iou)
_call_iou = caller(box_iou_op)


# ---- the public functions ----


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
    """Fused L1 + (1 - IoU variant) loss of paired boxes.

    pred, target: (N, 4) float tensors on one device. mode: iou|giou|diou|ciou. box_format:
    xyxy|cxcywh (the IoU term always works on xyxy; the L1 term on the given coordinates).
    weight: (N,) per box, or (N, 4) per coordinate (mmdet's bbox weights: coordinate k's |p_k - t_k|
    weighted by w_k in the L1 term, the IoU term by mean_k w_k). reduction: none -> (N,), sum, or
    mean = sum / (avg_factor or N); avg_factor (a number > 0 or a one-element tensor) is for "mean"
    only. The loss is float32 for half inputs (float64 for float64); gradients come back in the input
    dtype. No NaN for finite input; a NaN or Inf coordinate gives a NaN loss.
    """
    pred, target = _promote(pred, target)
    if weight is not None:
        check_tensor("weight", weight)
        if weight.is_floating_point():
            weight = weight.to(acc_dtype(pred.dtype))
    reduction, avg_factor, divisor = reduction_args(reduction, avg_factor)
    options = dict(
        mode=check_choice("mode", mode, MODES), box_format=check_choice("box_format", box_format, FORMATS),
        l1_weight=check_number("l1_weight", l1_weight), iou_weight=check_number("iou_weight", iou_weight),
        eps=check_number("eps", eps, minimum=0.0), reduction=reduction, avg_factor=avg_factor,
    )  # fmt: skip
    if _gradient_in_forward(pred, weight, reduction):
        loss = _call_forward_with_grad(pred=pred, target=target, weight=weight, target_grad=target.requires_grad,
                                       **options)[0]  # fmt: skip
    else:
        loss = _call_forward(pred=pred, target=target, weight=weight, **options)
    return loss if divisor is None else divide_by_avg_factor(loss, divisor)


def _gradient_in_forward(pred, weight, reduction) -> bool:
    """Whether box_loss takes box_loss_forward_with_grad (module docstring): a reduced loss on the
    CPU that will be differentiated with respect to pred, and not with respect to a weight, with the
    native kernels (the reference twin gains nothing from it)."""
    return (
        reduction != "none" and pred.requires_grad and torch.is_grad_enabled() and pred.device.type == "cpu"
        and (weight is None or not weight.requires_grad) and _native.use_native("cpu")
    )  # fmt: skip


def box_iou(
    pred: torch.Tensor, target: torch.Tensor, *, mode: str = "iou", box_format: str = "xyxy", eps: float = 1e-7
) -> torch.Tensor:
    """Paired IoU variant (N,) of pred[i] and target[i]: iou, giou, diou or ciou (differentiable)."""
    pred, target = _promote(pred, target)
    return _call_iou(
        pred=pred, target=target, mode=check_choice("mode", mode, MODES),
        box_format=check_choice("box_format", box_format, FORMATS), eps=check_number("eps", eps, minimum=0.0),
    )  # fmt: skip


class BoxLoss(torch.nn.Module):
    """pyfast.box_loss as a module: the options at construction, then
    `loss_fn(pred, target, weight=None, avg_factor=None)`."""

    def __init__(
        self,
        mode: str = "giou",
        box_format: str = "xyxy",
        l1_weight: float = 1.0,
        iou_weight: float = 1.0,
        reduction: str = "mean",
        eps: float = 1e-7,
    ) -> None:
        super().__init__()
        self.mode = check_choice("mode", mode, MODES)
        self.box_format = check_choice("box_format", box_format, FORMATS)
        self.l1_weight = check_number("l1_weight", l1_weight)
        self.iou_weight = check_number("iou_weight", iou_weight)
        self.reduction = check_choice("reduction", reduction, ("none", "sum", "mean"))
        self.eps = check_number("eps", eps, minimum=0.0)

    def forward(self, pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                avg_factor=None) -> torch.Tensor:  # fmt: skip
        return box_loss(
            pred, target, mode=self.mode, box_format=self.box_format, l1_weight=self.l1_weight,
            iou_weight=self.iou_weight, weight=weight, reduction=self.reduction, avg_factor=avg_factor, eps=self.eps,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (f"mode={self.mode!r}, box_format={self.box_format!r}, l1_weight={self.l1_weight}, "
                f"iou_weight={self.iou_weight}, reduction={self.reduction!r}, eps={self.eps}")  # fmt: skip
