"""Pure-PyTorch twins of the fused ops.

Each function here is the executable specification of its op (see docs/architecture.md): the tests compare
the kernels against it in float64, the benchmarks use it as the eager baseline (and compile it
for the torch.compile baseline), and the public ops fall back to it where no native backend
exists. Written for clarity, not speed; autograd provides the gradients.
"""

from __future__ import annotations

import math

import torch

from pyfast.ops._checks import divide_by_avg_factor

# The names the ops take; pyfast._C's enums carry the same ones (tests/ops/test_native_boundary.py).
BOX_MODES = ("iou", "giou", "diou", "ciou")
BOX_FORMATS = ("xyxy", "cxcywh")
# CIoU's aspect-ratio angle of a box passes its full gradient only when the box's diagonal is at
# least this fraction of the enclosing box's diagonal (csrc/box_loss/box_loss_math.h: kAspectFloor).
BOX_ASPECT_FLOOR = 0.01
# The per-mask sums of the fused mask loss's forward, in order.
MASK_SUMS = ("ce", "focal", "pt", "p", "t", "bad_targets")


def _acc(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def _nonfinite_poison(*boxes: torch.Tensor) -> torch.Tensor:
    """0 per box pair for finite coordinates, NaN when any coordinate is NaN or infinite, in value
    and in gradient: bad input shows up as NaN instead of being absorbed by a max() or a clamp.

    Written as boxes * (0 or NaN): the simpler `b - b` adds gradients of +1 and -1 that cancel only
    after absorbing the true ones of large boxes (1e-21 for 1e20-scale coordinates).
    """
    finite = torch.stack([torch.isfinite(b).all(-1) for b in boxes]).all(0)
    factor = torch.where(finite, 0.0, math.nan).to(boxes[0].dtype).unsqueeze(-1)
    return sum((b * factor).sum(-1) for b in boxes)


def _hull_extent(a1, a2, b1, b2):
    """Enclosing-box extent along one axis: the hull of all four coordinates.

    For valid boxes this is max(a2, b2) - min(a1, b1), the usual enclosing box; for inverted boxes
    it never falls below the centre distance, so the GIoU/DIoU penalties stay in [0, 1].
    """
    hi = torch.maximum(torch.maximum(a2, b2), torch.maximum(a1, b1))
    lo = torch.minimum(torch.minimum(a1, b1), torch.minimum(a2, b2))
    return hi - lo


def _gradient_only_where(live: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`value`, passing its gradient only where `live` holds."""
    return torch.where(live, value, value.detach())


def _aspect_angle(w, h, c2, eps):
    """atan(w / (h + eps)), its gradient scaled by min(1, |(w, h + eps)|^2 / (BOX_ASPECT_FLOOR^2 c2)).

    The angle's gradient has norm 1 / |(w, h + eps)|: ~1/eps for a point box. Scaled so, it never
    exceeds 1 / (BOX_ASPECT_FLOOR * sqrt(c2)), c2 the enclosing box's squared diagonal; boxes with a
    diagonal of at least BOX_ASPECT_FLOOR of the enclosing one are untouched.
    """
    angle = torch.atan(w / (h + eps))
    scale = ((w**2 + (h + eps) ** 2) / (BOX_ASPECT_FLOOR**2 * c2)).clamp(max=1).detach()
    return angle.detach() + (angle - angle.detach()) * scale


def box_iou_reference(pred, target, *, mode="iou", box_format="xyxy", eps=1e-7) -> torch.Tensor:
    """Paired IoU variant (N,) of two sets of boxes, computed in float32 (float64 for float64).

    Degenerate pairs get bounded gradients: a zero union (both boxes of zero area) makes the IoU
    0 / eps = 0 without gradient, a zero-area enclosing box does the same for the GIoU penalty, and
    CIoU's aspect angles follow _aspect_angle.
    """
    p, t = _acc(pred), _acc(target)
    poison = _nonfinite_poison(p, t)
    if box_format == "cxcywh":
        p, t = cxcywh_to_xyxy(p), cxcywh_to_xyxy(t)
    px1, py1, px2, py2 = p.unbind(-1)
    tx1, ty1, tx2, ty2 = t.unbind(-1)
    wp, hp = (px2 - px1).clamp(min=0), (py2 - py1).clamp(min=0)
    wg, hg = (tx2 - tx1).clamp(min=0), (ty2 - ty1).clamp(min=0)
    iw = (torch.minimum(px2, tx2) - torch.maximum(px1, tx1)).clamp(min=0)
    ih = (torch.minimum(py2, ty2) - torch.maximum(py1, ty1)).clamp(min=0)
    inter = iw * ih
    union = wp * hp + wg * hg - inter
    iou = _gradient_only_where(union > 0, inter / (union + eps))
    if mode == "iou":
        return iou + poison
    cw = _hull_extent(px1, px2, tx1, tx2)
    ch = _hull_extent(py1, py2, ty1, ty2)
    if mode == "giou":
        area_c = cw * ch
        return iou - _gradient_only_where(area_c > 0, (area_c - union) / (area_c + eps)) + poison
    dx = (px1 + px2 - tx1 - tx2) / 2
    dy = (py1 + py2 - ty1 - ty2) / 2
    c2 = cw**2 + ch**2 + eps
    diou = iou - (dx**2 + dy**2) / c2
    if mode == "diou":
        return diou + poison
    v = (4 / math.pi**2) * (_aspect_angle(wg, hg, c2, eps) - _aspect_angle(wp, hp, c2, eps)) ** 2
    with torch.no_grad():
        alpha = v / (1 - iou + v + eps)
    return diou - alpha * v + poison


def _reduce(loss: torch.Tensor, reduction: str, avg_factor) -> torch.Tensor:
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    if avg_factor is None:
        return total / max(loss.shape[0], 1)
    if isinstance(avg_factor, torch.Tensor):
        return divide_by_avg_factor(total, avg_factor)
    return total / avg_factor


def box_loss_reference(
    pred,
    target,
    *,
    mode="giou",
    box_format="xyxy",
    l1_weight=1.0,
    iou_weight=1.0,
    weight=None,
    reduction="mean",
    avg_factor=None,
    eps=1e-7,
) -> torch.Tensor:
    """L1 (on the given coordinates) + (1 - IoU variant) per box, weighted and reduced.

    weight: (N,) per box, or (N, 4) per coordinate as mmdet's bbox weights: each |p_k - t_k| of the
    L1 term is weighted by w_k, the IoU term by mean_k w_k.
    """
    p, t = _acc(pred), _acc(target)
    variant = box_iou_reference(p, t, mode=mode, box_format=box_format, eps=eps)
    if weight is not None and weight.dim() == 2:
        w = weight.to(p.dtype)
        loss = l1_weight * ((p - t).abs() * w).mean(-1) + iou_weight * (1 - variant) * w.mean(-1)
        return _reduce(loss, reduction, avg_factor)
    loss = l1_weight * (p - t).abs().mean(-1) + iou_weight * (1 - variant)
    if weight is not None:
        loss = loss * weight.to(loss.dtype)
    return _reduce(loss, reduction, avg_factor)


def _mask_rows(logits: torch.Tensor, targets: torch.Tensor):
    """(N, M) logits in the accumulation dtype and targets as numbers of that dtype.

    bool/uint8 masks are binary: any non-zero byte is foreground.
    """
    x = _acc(logits)
    x = x.reshape(x.shape[0], math.prod(x.shape[1:]))
    if targets.dtype in (torch.bool, torch.uint8):
        t = (targets != 0).to(x.dtype)
    else:
        t = targets.to(x.dtype)
    return x, t.reshape(x.shape)


def bad_target_counts(t: torch.Tensor) -> torch.Tensor:
    """Per mask, the targets outside [0, 1]: float targets are probabilities, so a mask with one
    (a 0/255 mask passed as float, a negative value) has no valid loss or IoU. Its loss and IoU
    are NaN rather than a wrong number."""
    return ((t < 0) | (t > 1)).sum(-1)


def _poison_bad_targets(values: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    # Added as a constant: the gradient of the other masks stays untouched.
    return values + torch.where(bad_target_counts(t) > 0, math.nan, 0.0).to(values.dtype)


def mask_loss_reference(
    logits,
    targets,
    *,
    bce_weight=1.0,
    dice_weight=1.0,
    focal_weight=0.0,
    alpha=0.25,
    gamma=2.0,
    smooth=1.0,
    reduction="mean",
    avg_factor=None,
) -> torch.Tensor:
    """BCE + dice + focal loss per mask (the first dim indexes masks), weighted and reduced."""
    x, t = _mask_rows(logits, targets)
    p, q = torch.sigmoid(x), torch.sigmoid(-x)  # q = 1 - p without cancellation
    # ce = max(x, 0) - x t + log1p(exp(-|x|)) = log(1 + e^x) - x t, written with logaddexp so that
    # autograd gives the true derivative p - t at x = 0 (max and abs have kinks there).
    ce = torch.logaddexp(x, torch.zeros_like(x)) - x * t
    bce = ce.mean(-1)
    dice = 1 - (2 * (p * t).sum(-1) + smooth) / (p.sum(-1) + t.sum(-1) + smooth)
    loss = bce_weight * bce + dice_weight * dice
    if focal_weight != 0:
        one_minus_pt = p * (1 - t) + q * t
        alpha_t = alpha * t + (1 - alpha) * (1 - t) if alpha >= 0 else torch.ones_like(t)
        loss = loss + focal_weight * (one_minus_pt.pow(gamma) * alpha_t * ce).mean(-1)
    return _reduce(_poison_bad_targets(loss, t), reduction, avg_factor)


@torch.no_grad()
def mask_sums_reference(logits, targets, *, alpha=0.25, gamma=2.0, focal_weight=0.0) -> torch.Tensor:
    """The per-mask sums (N, len(MASK_SUMS)) that the fused forward keeps for its backward."""
    x, t = _mask_rows(logits, targets)
    p = torch.sigmoid(x)
    ce = torch.logaddexp(x, torch.zeros_like(x)) - x * t
    if focal_weight != 0:
        one_minus_pt = p * (1 - t) + torch.sigmoid(-x) * t
        alpha_t = alpha * t + (1 - alpha) * (1 - t) if alpha >= 0 else torch.ones_like(t)
        focal = (one_minus_pt.pow(gamma) * alpha_t * ce).sum(-1)
    else:
        focal = torch.zeros_like(ce[:, 0])
    sums = {"ce": ce.sum(-1), "focal": focal, "pt": (p * t).sum(-1), "p": p.sum(-1), "t": t.sum(-1),
            "bad_targets": bad_target_counts(t).to(x.dtype)}
    return torch.stack([sums[name] for name in MASK_SUMS], dim=-1)


@torch.no_grad()
def mask_iou_reference(logits, targets, threshold=0.0) -> torch.Tensor:
    """|x > threshold AND t| / max(|x > threshold OR t|, 1) per mask; fuzzy min/max for soft t.
    NaN for a mask with a NaN logit or a float target outside [0, 1]."""
    x, t = _mask_rows(logits, targets)
    b = (x > threshold).to(x.dtype)
    inter = (b * t).sum(-1)
    union = (b + t - b * t).sum(-1)
    iou = inter / union.clamp(min=1)
    return torch.where(x.isnan().any(-1) | (bad_target_counts(t) > 0), torch.full_like(iou, float("nan")), iou)


def pack_reference(tensors, *, dtype=torch.float16, saturate=False):
    """Casts each tensor with `.to(dtype)` into one flat buffer; per tensor counts the non-finite
    values and the overflows (finite in the source, infinite after the cast) and takes max |x| over
    the finite values. Saturation replaces overflows by +-finfo(dtype).max."""
    parts, counts, absmax = [], [], []
    top = torch.finfo(dtype).max
    for t in tensors:
        x = t.to(dtype).reshape(-1)
        finite = torch.isfinite(t).reshape(-1)
        over = finite & torch.isinf(x)
        if saturate:
            x = torch.where(over, torch.full_like(x, top).copysign(x), x)
        parts.append(x)
        counts.append(torch.stack(((~finite).sum(), over.sum())))
        magnitude = torch.where(finite, t.reshape(-1).abs(), torch.zeros((), dtype=t.dtype, device=t.device))
        absmax.append(magnitude.max().to(torch.float64) if t.numel() else torch.zeros((), dtype=torch.float64, device=t.device))
    device = tensors[0].device if tensors else torch.device("cpu")
    buffer = torch.cat(parts) if parts else torch.empty(0, dtype=dtype, device=device)
    count_t = torch.stack(counts).to(torch.int64) if counts else torch.zeros((0, 2), dtype=torch.int64, device=device)
    absmax_t = torch.stack(absmax) if absmax else torch.zeros((0,), dtype=torch.float64, device=device)
    return buffer, count_t, absmax_t
