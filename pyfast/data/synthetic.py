"""An embedded, deterministic synthetic data set: textured backgrounds with 1-6 shapes each.

Sample i is a pure function of (seed, i, image_size, GENERATOR_VERSION): any DataLoader worker
regenerates it without shared state, and the cache key names exactly those inputs. Objects differ
in kind, size and colour but always contrast with the background around them, so a small head on
frozen random-conv features can learn where a jittered box should really be.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw

from .sample import Sample
from .source import Source, limit_count

# Bump when the drawing changes: it is part of every synthetic cache key.
GENERATOR_VERSION = 1
SHAPE_KINDS = ("rectangle", "ellipse", "triangle", "polygon", "ring")
MIN_OBJECTS, MAX_OBJECTS = 1, 6
MIN_IMAGE_SIZE = 32
_MIN_CONTRAST = 90.0  # L2 distance in RGB between an object's colour and the background under it
_MAX_OVERLAP_IOU = 0.3
_MIN_VISIBLE_FRACTION = 0.5


def _smooth_noise(rng: np.random.Generator, size: int, cells: int, amplitude: float) -> np.ndarray:
    """Low-frequency texture: a coarse random grid upsampled bilinearly, (size, size, 3) float32."""
    coarse = rng.normal(0.0, amplitude, (3, cells, cells)).astype(np.float32)
    channels = [np.asarray(Image.fromarray(c, mode="F").resize((size, size), Image.BILINEAR)) for c in coarse]
    return np.stack(channels, axis=2)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    base = rng.uniform(30.0, 225.0, 3).astype(np.float32)
    texture = _smooth_noise(rng, size, int(rng.integers(3, 9)), amplitude=22.0)
    angle = rng.uniform(0.0, 2.0 * np.pi)
    ramp = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    gradient = np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None]
    gradient = gradient[:, :, None] * rng.uniform(-30.0, 30.0, 3).astype(np.float32)
    grain = rng.normal(0.0, 6.0, (size, size, 3)).astype(np.float32)
    return base + texture + gradient + grain


def _shape_mask(rng: np.random.Generator, kind: str, box: Tuple[float, float, float, float], size: int) -> np.ndarray:
    x0, y0, x1, y1 = box
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    if kind == "rectangle":
        draw.rectangle([x0, y0, x1, y1], fill=1)
    elif kind == "ellipse":
        draw.ellipse([x0, y0, x1, y1], fill=1)
    elif kind == "ring":
        draw.ellipse([x0, y0, x1, y1], fill=1)
        inner = rng.uniform(0.35, 0.65)
        draw.ellipse([cx - rx * inner, cy - ry * inner, cx + rx * inner, cy + ry * inner], fill=0)
    elif kind == "triangle":
        # One vertex on the top edge, two on the bottom: the triangle spans its box.
        draw.polygon([(rng.uniform(x0, x1), y0), (x0, y1), (x1, y1)], fill=1)
    elif kind == "polygon":
        count = int(rng.integers(5, 9))
        angles = np.sort(rng.uniform(0.0, 2.0 * np.pi, count))
        radii = rng.uniform(0.6, 1.0, count)
        points = [(cx + rx * r * np.cos(a), cy + ry * r * np.sin(a)) for a, r in zip(angles, radii)]
        draw.polygon(points, fill=1)
    else:  # pragma: no cover - SHAPE_KINDS is closed
        raise ValueError(f"unknown shape kind {kind!r}")
    return np.asarray(canvas, dtype=np.uint8) != 0


def _box_iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _contrasting_colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    for _ in range(16):
        colour = rng.uniform(0.0, 255.0, 3)
        if np.linalg.norm(colour - background) >= _MIN_CONTRAST:
            return colour
    # Deterministic fallback (still drawn from rng above): push away from the background.
    return np.where(background > 127.0, background - 120.0, background + 120.0)


def render_synthetic(seed: int, index: int, image_size: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw sample `index`: image uint8 (S, S, 3), boxes float32 (K, 4) tight xyxy, masks bool (K, S, S).

    Masks are the visible parts (later shapes occlude earlier ones); a shape that would be mostly
    hidden is not drawn at all, so every drawn shape is labelled and every label is visible.
    """
    size = image_size
    rng = np.random.default_rng([GENERATOR_VERSION, seed, index])
    image = _background(rng, size)

    boxes: List[Tuple[float, float, float, float]] = []
    masks: List[np.ndarray] = []
    kinds: List[str] = []
    for _ in range(int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))):
        for _attempt in range(10):
            width, height = rng.uniform(0.12, 0.45, 2) * size
            width, height = max(width, 6.0), max(height, 6.0)
            x0, y0 = rng.uniform(0.0, size - width), rng.uniform(0.0, size - height)
            box = (x0, y0, x0 + width, y0 + height)
            if all(_box_iou(box, other) < _MAX_OVERLAP_IOU for other in boxes):
                kind = SHAPE_KINDS[int(rng.integers(len(SHAPE_KINDS)))]
                boxes.append(box)
                masks.append(_shape_mask(rng, kind, box, size))
                kinds.append(kind)
                break

    # Later shapes are drawn on top: walk back to front to find what stays visible.
    occluded = np.zeros((size, size), dtype=bool)
    visible: List[Optional[np.ndarray]] = [None] * len(masks)
    for j in range(len(masks) - 1, -1, -1):
        mask_visible = masks[j] & ~occluded
        area = int(masks[j].sum())
        if area >= 16 and mask_visible.sum() >= _MIN_VISIBLE_FRACTION * area:
            visible[j] = mask_visible
            occluded |= masks[j]

    out_boxes, out_masks = [], []
    for j, mask in enumerate(masks):
        if visible[j] is None:
            continue
        colour = _contrasting_colour(rng, image[mask].mean(axis=0))
        shading = rng.normal(0.0, 7.0, (int(mask.sum()), 3))
        image[mask] = colour + shading
    for j, mask in enumerate(visible):
        if mask is None:
            continue
        ys, xs = np.nonzero(mask)
        out_boxes.append((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1))
        out_masks.append(mask)

    image_u8 = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    boxes_array = np.asarray(out_boxes, dtype=np.float32).reshape(-1, 4)
    masks_array = np.stack(out_masks) if out_masks else np.zeros((0, size, size), dtype=bool)
    return image_u8, boxes_array, masks_array


class SyntheticSource(Source):
    """`num_samples` generated samples of `image_size` x `image_size` pixels; nothing is stored."""

    kind = "synthetic"

    def __init__(
        self,
        num_samples: int = 512,
        image_size: int = 128,
        seed: int = 0,
        *,
        max_samples: Optional[int] = None,
        name: Optional[str] = None,
    ):
        for argument, value, minimum in (("num_samples", num_samples, 1), ("image_size", image_size, MIN_IMAGE_SIZE), ("seed", seed, 0)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise TypeError(f"{argument} must be an int, got {type(value).__name__}")
            if value < minimum:
                raise ValueError(f"{argument} must be >= {minimum}, got {value}")
        super().__init__(name or "synthetic")
        self.num_samples = limit_count(int(num_samples), max_samples)
        self.image_size = int(image_size)
        self.seed = int(seed)

    def __len__(self) -> int:
        return self.num_samples

    def describe(self, index: int) -> str:
        return f"synthetic[{self._check_index(index)}]"

    def key(self, index: int) -> str:
        return f"synthetic-v{GENERATOR_VERSION}-seed{self.seed}-size{self.image_size}-{self._check_index(index)}"

    def load(self, index: int) -> Sample:
        index = self._check_index(index)
        image, boxes, masks = render_synthetic(self.seed, index, self.image_size)
        return Sample(
            image=image,
            prompt_boxes=boxes,
            boxes=boxes.copy(),
            masks=masks,
            key=self.key(index),
            source=self.name,
            file=self.describe(index),
        )
