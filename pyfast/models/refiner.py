"""The refiner: RoI features for each input box → refined box, mask and predicted mask IoU.

Each input box is widened by `context` (so a box that cut the object short still sees all of it)
and pooled with RoIAlign from each feature map the refiner was built for (one map, or several of a
multi-level encoder, pooled at their own strides and concatenated along channels). The box head
predicts how far each edge of the input box moves; the mask head predicts the object's mask inside
the widened window; the optional IoU head predicts how well that mask will match. The training
objective that supervises these outputs is `pyfast.train.objective`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

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


def _as_tuple(value, name: str) -> tuple[int, ...]:
    values = tuple(int(v) for v in value) if isinstance(value, Sequence) else (int(value),)
    if not values or any(v < 1 for v in values):
        raise ValueError(f"{name} must be a positive int or a non-empty sequence of them, got {value!r}")
    return values


class Refiner(nn.Module):
    """Box, mask and IoU heads over RoIAligned features.

    in_channels, stride: one int each for a single feature map, or one entry per map for several
    (the maps are passed to `forward` in the same order).
    """

    def __init__(
        self,
        in_channels: int | Sequence[int],
        stride: int | Sequence[int],
        roi_size: int = 14,
        context: float = 1.5,
        hidden: int = 64,
        iou_head: bool = True,
    ):
        super().__init__()
        self.channels = _as_tuple(in_channels, "in_channels")
        self.strides = _as_tuple(stride, "stride")
        if len(self.channels) != len(self.strides):
            raise ValueError(f"in_channels {self.channels} and stride {self.strides} must name the same maps")
        self.roi_size = int(roi_size)
        self.mask_size = 2 * self.roi_size
        self.context = float(context)
        total = sum(self.channels)
        self.box_head = BoxHead(total, roi_size, context, hidden=hidden, iou_head=iou_head)
        self.mask_head = MaskHead(total, hidden=hidden)

    def windows(self, boxes: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The widened RoI of each box, as (N, 5) [index, x1, y1, x2, y2]."""
        c = 0.5 * (boxes[:, :2] + boxes[:, 2:])
        half = 0.5 * self.context * (boxes[:, 2:] - boxes[:, :2]).clamp(min=1.0)
        return torch.cat([index[:, None].to(boxes.dtype), c - half, c + half], dim=1)

    def forward(
        self, features: torch.Tensor | Sequence[torch.Tensor], boxes: torch.Tensor, index: torch.Tensor
    ) -> RefinerOutput:
        maps = [features] if isinstance(features, torch.Tensor) else list(features)
        if len(maps) != len(self.strides):
            raise ValueError(f"the refiner was built for {len(self.strides)} feature map(s), got {len(maps)}")
        rois = self.windows(boxes, index)
        pooled = [
            roi_align(f, rois, self.roi_size, spatial_scale=1.0 / s, sampling_ratio=2) for f, s in zip(maps, self.strides)
        ]
        pooled = pooled[0] if len(pooled) == 1 else torch.cat(pooled, dim=1)
        offsets, iou_logits = self.box_head(pooled)
        return RefinerOutput(rois, decode(boxes, offsets, self.context), self.mask_head(pooled), iou_logits)
