"""Realistic input-box noise: each box is shifted and rescaled by a fraction of its own size.

The noise of a sample is a pure function of (seed, epoch, sample key), so a resumed run, a
DataLoader worker, or a second machine sees the same input boxes. Validation uses a fixed epoch
(`VAL_EPOCH`): its input boxes never change between evaluations.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

VAL_EPOCH = -1
MIN_SIZE = 2.0


def _rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return np.random.default_rng([int(seed), int(epoch) + 1, int.from_bytes(digest, "little")])


def jitter_boxes(
    boxes: torch.Tensor, key: str, *, seed: int, epoch: int, shift: float, scale: float, image_size: int
) -> torch.Tensor:
    """(K, 4) xyxy → jittered (K, 4) float32: centre moved by U(-shift, shift) of the width/height,
    width/height multiplied by exp(U(-scale, scale)), clipped to the image, at least MIN_SIZE wide."""
    boxes = boxes.float()
    k = boxes.shape[0]
    if k == 0 or (shift == 0 and scale == 0):
        return boxes.clone()
    noise = torch.from_numpy(_rng(seed, epoch, key).uniform(-1.0, 1.0, (k, 4)).astype(np.float32))
    w = (boxes[:, 2] - boxes[:, 0]).clamp(min=MIN_SIZE)
    h = (boxes[:, 3] - boxes[:, 1]).clamp(min=MIN_SIZE)
    cx = 0.5 * (boxes[:, 0] + boxes[:, 2]) + noise[:, 0] * shift * w
    cy = 0.5 * (boxes[:, 1] + boxes[:, 3]) + noise[:, 1] * shift * h
    w = w * torch.exp(noise[:, 2] * scale)
    h = h * torch.exp(noise[:, 3] * scale)
    out = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=1).clamp(0.0, float(image_size))
    # keep a minimum size after clipping (a box pushed against the border)
    out[:, 2] = torch.maximum(out[:, 2], out[:, 0] + MIN_SIZE).clamp(max=float(image_size))
    out[:, 0] = torch.minimum(out[:, 0], out[:, 2] - MIN_SIZE)
    out[:, 3] = torch.maximum(out[:, 3], out[:, 1] + MIN_SIZE).clamp(max=float(image_size))
    out[:, 1] = torch.minimum(out[:, 1], out[:, 3] - MIN_SIZE)
    return out
