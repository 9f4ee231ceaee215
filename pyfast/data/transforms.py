"""Preprocessing from a validated Sample to fixed-size tensors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from PIL import Image

from .sample import Sample

LETTERBOX_VERSION = 1


def images_to_device(images: torch.Tensor, device) -> torch.Tensor:
    """Letterboxed uint8 (B, 3, S, S) images as float in [0, 1] on `device`: the copy moves the
    uint8 bytes (non-blocking from pinned memory) and the conversion runs where the backbone does.
    Float images pass through as they are."""
    images = images.to(device, non_blocking=True)
    return images if images.is_floating_point() else images.float().div_(255.0)


@dataclass
class LetterboxedSample:
    """A Sample after letterboxing: torch tensors at a fixed size S.

    image: uint8 (3, S, S), channels first (the backbone sees it as float in [0, 1]: value / 255);
        None when the sample's features come from the feature cache and its image was never decoded.
    prompt_boxes, boxes: float32 (K, 4) in letterboxed pixels; masks: bool (K, S, S).
    `scale` = (sx, sy) maps original pixels to letterboxed ones (divide to go back); `original_size`
    = (H, W) before resizing; pixels beyond the resized image are padding.
    index: the sample's global index in its dataset (-1 when unknown).
    features: the cached feature maps (name -> float16 (C, h, w)) when `image` is None.
    cache: the outcome of the feature-cache lookup ("hit", "miss", "corrupt"), None when none was made.
    """

    image: Optional[torch.Tensor]
    prompt_boxes: torch.Tensor
    boxes: torch.Tensor
    masks: torch.Tensor
    key: str
    source: str
    file: str
    scale: Tuple[float, float]
    original_size: Tuple[int, int]
    index: int = -1
    features: Optional[Dict[str, torch.Tensor]] = None
    cache: Optional[str] = None

    @property
    def num_objects(self) -> int:
        return int(self.boxes.shape[0])


class Letterbox:
    """Resize the longest side to `size` (bilinear image, nearest masks), pad bottom/right with 0.

    `fingerprint()` lists every parameter that shapes the output, for the feature-cache fingerprint:
    features cached under another preprocessing must never be returned. A sample without an image
    (its features are cached) gets the same boxes and masks as it would with one.
    """

    def __init__(self, size: int):
        if not isinstance(size, (int, np.integer)) or isinstance(size, bool):
            raise TypeError(f"size must be an int, got {type(size).__name__}")
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size = int(size)

    def fingerprint(self) -> dict:
        return {
            "transform": "letterbox",
            "version": LETTERBOX_VERSION,
            "size": self.size,
            "image_resample": "bilinear",
            "mask_resample": "nearest",
            "pad": "bottom-right",
            "pad_value": 0,
            "image_range": [0.0, 1.0],
        }

    def __repr__(self) -> str:
        return f"Letterbox(size={self.size})"

    def __call__(self, sample: Sample) -> LetterboxedSample:
        height, width = sample.image_size
        ratio = self.size / max(height, width)
        new_width = min(self.size, max(1, int(round(width * ratio))))
        new_height = min(self.size, max(1, int(round(height * ratio))))
        # Per-axis factors, so boxes land exactly on the resized pixel grid despite rounding.
        sx, sy = new_width / width, new_height / height
        same = (new_width, new_height) == (width, height)

        image_tensor = None
        if sample.image is not None:
            image = np.zeros((self.size, self.size, 3), dtype=np.uint8)
            if same:
                image[:height, :width] = sample.image
            else:
                resized = Image.fromarray(sample.image).resize((new_width, new_height), Image.BILINEAR)
                image[:new_height, :new_width] = np.asarray(resized)
            # uint8 until it reaches the backbone's device: a quarter of the bytes of float32 through
            # the workers' shared memory, pinning and the host-to-device copy.
            image_tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))

        if same and (height, width) == (self.size, self.size):
            masks = np.ascontiguousarray(sample.masks, dtype=bool)  # already the output size: no copy
        elif same:
            masks = np.zeros((sample.masks.shape[0], self.size, self.size), dtype=bool)
            masks[:, :height, :width] = sample.masks
        else:
            masks = np.zeros((sample.masks.shape[0], self.size, self.size), dtype=bool)
            # Nearest-neighbour by pixel centres: output pixel (r, c) takes source ((r+0.5)/sy, (c+0.5)/sx).
            rows = np.minimum(((np.arange(new_height) + 0.5) / sy).astype(np.int64), height - 1)
            cols = np.minimum(((np.arange(new_width) + 0.5) / sx).astype(np.int64), width - 1)
            masks[:, :new_height, :new_width] = sample.masks[:, rows][:, :, cols]

        factors = np.array([sx, sy, sx, sy], dtype=np.float32)
        return LetterboxedSample(
            image=image_tensor,
            prompt_boxes=torch.from_numpy(sample.prompt_boxes * factors),
            boxes=torch.from_numpy(sample.boxes * factors),
            masks=torch.from_numpy(masks),
            key=sample.key,
            source=sample.source,
            file=sample.file,
            scale=(sx, sy),
            original_size=(height, width),
        )


def letterbox(sample: Sample, size: int) -> LetterboxedSample:
    """Functional form of `Letterbox(size)(sample)`."""
    return Letterbox(size)(sample)
