"""The refiner: RoI features for each input box → refined box, mask and predicted mask IoU.

Each input box is widened by `context` (so a box that cut the object short still sees all of it)
and pooled from the feature map with RoIAlign. The box head predicts how far each edge of the input
box moves; the mask head predicts the object's mask inside the widened window; the optional IoU head
predicts how well that mask will match (trained towards `pyfast.mask_iou`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import pyfast
from pyfast.models.heads import BoxHead, MaskHead
from pyfast.models.roi_align import roi_align

@dataclass
class RefinerOutput:
    rois: torch.Tensor  # (N, 5) batch index + widened window, input pixels
    refined: torch.Tensor  # (N, 4) xyxy, float32
    mask_logits: torch.Tensor  # (N, M, M) over the window
    iou_logits: torch.Tensor | None  # (N,)


def flatten_boxes(boxes: list[torch.Tensor], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """A list of per-image (K_i, 4) boxes → (N, 4) float32 boxes and their (N,) image index."""
    device = device if device is not None else (boxes[0].device if boxes else "cpu")
    if not boxes:
        return torch.zeros(0, 4, device=device), torch.zeros(0, dtype=torch.long, device=device)
    flat = torch.cat([b.reshape(-1, 4).float() for b in boxes]).to(device)
    index = torch.cat([torch.full((len(b),), i, dtype=torch.long) for i, b in enumerate(boxes)]).to(device)
    return flat, index


def decode(boxes: torch.Tensor, offsets: torch.Tensor, context: float) -> torch.Tensor:
    """Move each edge of xyxy `boxes` by `offsets` (N, 4), given in units of the widened window
    (`context` times the box size, at least 1 pixel)."""
    size = (boxes[:, 2:] - boxes[:, :2]).clamp(min=1.0) * context  # (N, 2) window width, height
    return boxes + offsets.float() * size.repeat(1, 2)


class Refiner(nn.Module):
    def __init__(
        self,
        in_channels: int,
        stride: int,
        roi_size: int = 14,
        context: float = 1.5,
        hidden: int = 64,
        iou_head: bool = True,
    ):
        super().__init__()
        self.stride = int(stride)
        self.roi_size = int(roi_size)
        self.mask_size = 2 * self.roi_size
        self.context = float(context)
        self.box_head = BoxHead(in_channels, roi_size, context, hidden=hidden, iou_head=iou_head)
        self.mask_head = MaskHead(in_channels, hidden=hidden)

    def windows(self, boxes: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The widened RoI of each box, as (N, 5) [index, x1, y1, x2, y2]."""
        c = 0.5 * (boxes[:, :2] + boxes[:, 2:])
        half = 0.5 * self.context * (boxes[:, 2:] - boxes[:, :2]).clamp(min=1.0)
        return torch.cat([index[:, None].to(boxes.dtype), c - half, c + half], dim=1)

    def forward(self, features: torch.Tensor, boxes: torch.Tensor, index: torch.Tensor) -> RefinerOutput:
        rois = self.windows(boxes, index)
        pooled = roi_align(features, rois, self.roi_size, spatial_scale=1.0 / self.stride, sampling_ratio=2)
        offsets, iou_logits = self.box_head(pooled)
        return RefinerOutput(rois, decode(boxes, offsets, self.context), self.mask_head(pooled), iou_logits)


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


def refiner_loss(
    out: RefinerOutput,
    gt_boxes: torch.Tensor,
    gt_masks: torch.Tensor,
    image_size: int,
    weights: LossWeights = LossWeights(),
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss and its (detached) parts. Box loss is on boxes normalised by the image size."""
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
