"""Realistic input-box noise: each box is shifted and rescaled by a fraction of its own size.

The noise of a sample is a pure function of (seed, epoch, the sample's global dataset index), so a
resumed run, a DataLoader worker, or a second machine sees the same input boxes. Validation uses a
fixed epoch (`VAL_EPOCH`): its input boxes never change between evaluations. The noise is drawn on
the host (one small generator per sample); the boxes are moved on their own device, so jittering a
batch costs one small host-to-device copy and no host sync.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

VAL_EPOCH = -1
MIN_SIZE = 2.0


def box_noise(indices: Sequence[int], counts: Sequence[int], *, seed: int, epoch: int) -> torch.Tensor:
    """U(-1, 1) noise (N, 4) float32 for the boxes of samples `indices` (counts[i] boxes each), in order."""
    parts = [
        np.random.default_rng([int(seed), int(epoch) + 1, int(index)]).uniform(-1.0, 1.0, (int(k), 4))
        for index, k in zip(indices, counts)
    ]
    noise = np.concatenate(parts) if parts else np.zeros((0, 4))
    return torch.from_numpy(noise.astype(np.float32))


def jitter_boxes(boxes: torch.Tensor, noise: torch.Tensor, *, shift: float, scale: float, image_size: int) -> torch.Tensor:
    """(N, 4) xyxy → jittered (N, 4) float32: centre moved by noise * shift of the width/height,
    width/height multiplied by exp(noise * scale), clipped to the image, at least MIN_SIZE wide."""
    boxes = boxes.float()
    if boxes.shape[0] == 0 or (shift == 0 and scale == 0):
        return boxes.clone()
    noise = noise.to(boxes.device, non_blocking=True)
    w = (boxes[:, 2] - boxes[:, 0]).clamp(min=MIN_SIZE)
    h = (boxes[:, 3] - boxes[:, 1]).clamp(min=MIN_SIZE)
    cx = 0.5 * (boxes[:, 0] + boxes[:, 2]) + noise[:, 0] * shift * w
    cy = 0.5 * (boxes[:, 1] + boxes[:, 3]) + noise[:, 1] * shift * h
    w = w * torch.exp(noise[:, 2] * scale)
    h = h * torch.exp(noise[:, 3] * scale)
    size = float(image_size)
    out = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=1).clamp(0.0, size)
    # keep a minimum size after clipping (a box pushed against the border)
    x2 = torch.maximum(out[:, 2], out[:, 0] + MIN_SIZE).clamp(max=size)
    y2 = torch.maximum(out[:, 3], out[:, 1] + MIN_SIZE).clamp(max=size)
    x1 = torch.minimum(out[:, 0], x2 - MIN_SIZE)
    y1 = torch.minimum(out[:, 1], y2 - MIN_SIZE)
    return torch.stack([x1, y1, x2, y2], dim=1)
