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
from .source import SkipImage, Source, limit_count

# Bump when the drawing changes: it is part of every synthetic cache key.
GENERATOR_VERSION = 2
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


def _shape_mask(
    rng: np.random.Generator, kind: str, box: Tuple[float, float, float, float], size: int
) -> Tuple[np.ndarray, int, int]:
    """The shape drawn in its own window of the image: (bool mask, top row, left column). Drawing
    only the window (not an S x S canvas) keeps the cost of a sample independent of S."""
    left, top = max(int(np.floor(box[0])) - 1, 0), max(int(np.floor(box[1])) - 1, 0)
    right, bottom = min(int(np.ceil(box[2])) + 2, size), min(int(np.ceil(box[3])) + 2, size)
    x0, y0, x1, y1 = box[0] - left, box[1] - top, box[2] - left, box[3] - top
    canvas = Image.new("L", (right - left, bottom - top), 0)
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
        xs, ys = cx + rx * radii * np.cos(angles), cy + ry * radii * np.sin(angles)
        draw.polygon(list(zip(xs.tolist(), ys.tolist())), fill=1)
    else:  # pragma: no cover - SHAPE_KINDS is closed
        raise ValueError(f"unknown shape kind {kind!r}")
    return np.frombuffer(canvas.tobytes(), dtype=np.uint8).reshape(bottom - top, right - left) != 0, top, left


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


def render_synthetic(
    seed: int, index: int, image_size: int, *, image: bool = True
) -> Tuple[Optional[np.ndarray], np.ndarray, np.ndarray]:
    """Draw sample `index`: image uint8 (S, S, 3), boxes float32 (K, 4) tight xyxy, masks bool (K, S, S).

    Masks are the visible parts (later shapes occlude earlier ones); a shape that would be mostly
    hidden is not drawn at all, so every drawn shape is labelled and every label is visible.
    The layout (objects, shapes) and the paint (background, colours) come from separate random
    streams, so `image=False` returns (None, boxes, masks) without painting the image.
    """
    size = image_size
    rng = np.random.default_rng([GENERATOR_VERSION, seed, index, 0])  # the layout

    boxes: List[Tuple[float, float, float, float]] = []
    shapes: List[Tuple[np.ndarray, int, int]] = []  # (window mask, top, left)
    for _ in range(int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))):
        for _attempt in range(10):
            width, height = rng.uniform(0.12, 0.45, 2) * size
            width, height = max(width, 6.0), max(height, 6.0)
            x0, y0 = rng.uniform(0.0, size - width), rng.uniform(0.0, size - height)
            box = (x0, y0, x0 + width, y0 + height)
            if all(_box_iou(box, other) < _MAX_OVERLAP_IOU for other in boxes):
                kind = SHAPE_KINDS[int(rng.integers(len(SHAPE_KINDS)))]
                boxes.append(box)
                shapes.append(_shape_mask(rng, kind, box, size))
                break

    # Later shapes are drawn on top: walk back to front to find what stays visible.
    occluded = np.zeros((size, size), dtype=bool)
    visible: List[Optional[np.ndarray]] = [None] * len(shapes)
    for j in range(len(shapes) - 1, -1, -1):
        mask, top, left = shapes[j]
        covered = occluded[top : top + mask.shape[0], left : left + mask.shape[1]]
        mask_visible = mask & ~covered
        area = np.count_nonzero(mask)
        if area >= 16 and np.count_nonzero(mask_visible) >= _MIN_VISIBLE_FRACTION * area:
            visible[j] = mask_visible
            covered |= mask

    kept = [j for j, mask in enumerate(visible) if mask is not None]
    boxes_array = np.zeros((len(kept), 4), dtype=np.float32)
    masks_array = np.zeros((len(kept), size, size), dtype=bool)
    for k, j in enumerate(kept):
        mask, (_, top, left) = visible[j], shapes[j]
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        boxes_array[k] = (left + cols[0], top + rows[0], left + cols[-1] + 1, top + rows[-1] + 1)
        masks_array[k, top : top + mask.shape[0], left : left + mask.shape[1]] = mask
    if not image:
        return None, boxes_array, masks_array

    paint = np.random.default_rng([GENERATOR_VERSION, seed, index, 1])
    canvas = _background(paint, size)
    for j in kept:
        mask, top, left = shapes[j]
        window = canvas[top : top + mask.shape[0], left : left + mask.shape[1]]
        colour = _contrasting_colour(paint, window[mask].mean(axis=0))
        shading = paint.normal(0.0, 7.0, (int(np.count_nonzero(mask)), 3))
        window[mask] = colour + shading
    image_u8 = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return image_u8, boxes_array, masks_array


class SyntheticSource(Source):
    """`num_samples` generated samples of `image_size` x `image_size` pixels; nothing is stored."""

    kind = "synthetic"
    loads_without_image = True

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

    def load(self, index: int, skip_image: SkipImage = None) -> Sample:
        index = self._check_index(index)
        key = self.key(index)
        with_image = skip_image is None or not skip_image(key)
        image, boxes, masks = render_synthetic(self.seed, index, self.image_size, image=with_image)
        return Sample(
            image=image,
            prompt_boxes=boxes,
            boxes=boxes.copy(),
            masks=masks,
            key=key,
            source=self.name,
            file=self.describe(index),
            image_size=(self.image_size, self.image_size),
        )
