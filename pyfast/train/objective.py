"""The training objective of the refiner: box loss, mask loss and the IoU head's target.

    loss, parts = refiner_loss(out, gt_boxes, gt_masks, image_size, LossWeights(...))

Box loss (`pyfast.box_loss`, L1 + an IoU variant) is on boxes normalised by the image size; the
mask loss (`pyfast.mask_loss`, BCE + dice) compares the mask logits with the ground-truth masks
resampled onto each RoI window; the IoU head is trained towards `pyfast.mask_iou` of its own mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import pyfast
from pyfast.models.refiner import RefinerOutput
from pyfast.models.roi_align import roi_align


def mask_targets(masks: torch.Tensor, rois: torch.Tensor, size: int) -> torch.Tensor:
    """Ground-truth masks (N, H, W) resampled onto each RoI window → (N, size, size) bool."""
    own = torch.cat([torch.arange(len(rois), device=rois.device, dtype=rois.dtype)[:, None], rois[:, 1:]], dim=1)
    return roi_align(masks[:, None].float(), own, size, spatial_scale=1.0, sampling_ratio=2)[:, 0] >= 0.5


@dataclass
class LossWeights:
    box: float = 1.0
    mask: float = 1.0
    iou: float = 0.5
    box_mode: str = "giou"


def loss_part_names(iou_head: bool) -> list[str]:
    """The names of `refiner_loss`'s parts, in order, known before any batch is seen (a rank without
    a box in a step still reports them)."""
    return ["box", "mask"] + (["iou"] if iou_head else [])


def refiner_loss(
    out: RefinerOutput,
    gt_boxes: torch.Tensor,
    gt_masks: torch.Tensor,
    image_size: int,
    weights: LossWeights = LossWeights(),
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss and its (detached) parts, all on the device: nothing here reads back to the host."""
    scale = 1.0 / float(image_size)
    box = pyfast.box_loss(out.refined * scale, gt_boxes.float() * scale, mode=weights.box_mode)
    target = mask_targets(gt_masks, out.rois, out.mask_logits.shape[-1])
    mask = pyfast.mask_loss(out.mask_logits, target)
    total = weights.box * box + weights.mask * mask
    parts = {"box": box.detach(), "mask": mask.detach()}
    if out.iou_logits is not None:
        with torch.no_grad():
            iou_target = pyfast.mask_iou(out.mask_logits.detach(), target).float()
        iou = F.binary_cross_entropy_with_logits(out.iou_logits.float(), iou_target)
        total = total + weights.iou * iou
        parts["iou"] = iou.detach()
    return total, parts
