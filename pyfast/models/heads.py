"""Refinement heads over RoI-aligned features: box deltas (+ predicted mask IoU) and mask logits."""

from __future__ import annotations

import torch
from torch import nn


class BoxHead(nn.Module):
    """(N, C, R, R) → deltas (N, 4) and, optionally, a predicted mask IoU logit (N,).

    The delta layer starts at zero, so an untrained head returns the input boxes unchanged.
    """

    def __init__(self, in_channels: int, roi_size: int, hidden: int = 64, fc: int = 256, iou_head: bool = True):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride=2, padding=1),
            nn.ReLU(inplace=True),
        )
        side = (roi_size + 1) // 2
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(hidden * side * side, fc), nn.ReLU(inplace=True))
        self.deltas = nn.Linear(fc, 4)
        nn.init.zeros_(self.deltas.weight)
        nn.init.zeros_(self.deltas.bias)
        self.iou = nn.Linear(fc, 1) if iou_head else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = self.fc(self.conv(x))
        iou = self.iou(h).squeeze(1) if self.iou is not None else None
        return self.deltas(h), iou


class MaskHead(nn.Module):
    """(N, C, R, R) → mask logits (N, 2R, 2R) over the same RoI."""

    def __init__(self, in_channels: int, hidden: int = 64):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(hidden, hidden, 2, stride=2),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, 1, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).squeeze(1)
