"""Refinement heads over RoI-aligned features: box edge offsets (+ predicted mask IoU) and mask logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _groups(channels: int) -> int:
    """GroupNorm groups: 8 channels per group where possible."""
    for groups in (channels // 8, 4, 2, 1):
        if groups >= 1 and channels % groups == 0:
            return groups
    return 1


def _conv_gn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    """3x3 conv, GroupNorm, ReLU: the layers both heads are built from."""
    return [
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        nn.GroupNorm(_groups(out_channels), out_channels),
        nn.ReLU(inplace=True),
    ]


class BoxHead(nn.Module):
    """(N, C, R, R) window features → per-edge offsets (N, 4) and, optionally, an IoU logit (N,).

    Each edge is located by a soft-argmax: one logit map per edge (x1, y1, x2, y2) is averaged
    along the edge (over rows for x edges, over columns for y edges), a Gaussian prior centred on
    the input box's edge is added, and the expected position along the axis is the refined edge.
    The output is its offset from the input edge, in window units (1 = the window's width/height).
    The logit layer starts at zero, so an untrained head returns (close to) the input box. The
    design is translation-equivariant: it learns "where is the boundary" from few examples, where
    a flatten + fully-connected head must learn every position separately.
    """

    def __init__(
        self, in_channels: int, roi_size: int, context: float, hidden: int = 64, prior_sigma: float = 0.12,
        iou_head: bool = True,
    ):
        super().__init__()
        self.trunk = nn.Sequential(
            *_conv_gn_relu(in_channels, hidden),
            *_conv_gn_relu(hidden, hidden),
        )
        self.edges = nn.Conv2d(hidden, 4, 3, padding=1)
        nn.init.zeros_(self.edges.weight)
        nn.init.zeros_(self.edges.bias)
        # window coordinates (0..1) of the bin centres, and of the input box's edges in the window
        lo, hi = 0.5 - 0.5 / context, 0.5 + 0.5 / context
        positions = (torch.arange(roi_size, dtype=torch.float32) + 0.5) / roi_size
        self.register_buffer("positions", positions, persistent=False)
        anchors = torch.tensor([lo, lo, hi, hi])
        self.register_buffer("anchors", anchors, persistent=False)
        prior = -0.5 * ((positions[None, :] - anchors[:, None]) / prior_sigma) ** 2  # (4, R)
        self.register_buffer("prior", prior, persistent=False)
        self.iou = nn.Linear(hidden, 1) if iou_head else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = self.trunk(x)
        maps = self.edges(h).float()  # (N, 4, R, R): [x1, y1, x2, y2] logit maps
        along_x = maps[:, 0::2].mean(dim=2)  # x1, x2: average over rows → (N, 2, R)
        along_y = maps[:, 1::2].mean(dim=3)  # y1, y2: average over columns → (N, 2, R)
        logits = torch.stack([along_x[:, 0], along_y[:, 0], along_x[:, 1], along_y[:, 1]], dim=1) + self.prior
        expected = (F.softmax(logits, dim=-1) * self.positions).sum(-1)  # (N, 4) in window units
        # identity at init: subtract the prior's own expectation so zero logits give zero offsets
        base = (F.softmax(self.prior, dim=-1) * self.positions).sum(-1)
        offsets = expected - base
        iou = self.iou(h.mean(dim=(2, 3))).squeeze(1) if self.iou is not None else None
        return offsets, iou


class MaskHead(nn.Module):
    """(N, C, R, R) → mask logits (N, 2R, 2R) over the same RoI."""

    def __init__(self, in_channels: int, hidden: int = 64):
        super().__init__()
        self.body = nn.Sequential(
            *_conv_gn_relu(in_channels, hidden),
            *_conv_gn_relu(hidden, hidden),
            nn.ConvTranspose2d(hidden, hidden, 2, stride=2),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, 1, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).squeeze(1)
