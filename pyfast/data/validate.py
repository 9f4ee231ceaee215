"""Checks shared by every source: each one either returns a clean array or raises BadSample.

A wrong shape is reported, never truncated or broadcast into something that trains on garbage.
"""

from __future__ import annotations

import numpy as np

from .sample import BadSample

CATEGORY_UNREADABLE = "unreadable file"
CATEGORY_MISSING_KEY = "missing key"
CATEGORY_BAD_IMAGE = "bad image"
CATEGORY_BAD_BOXES = "bad boxes"
CATEGORY_NONFINITE_BOXES = "non-finite boxes"
CATEGORY_INVERTED_BOXES = "inverted boxes"
CATEGORY_BAD_MASKS = "bad masks"
CATEGORY_PAIRED = "inconsistent paired fields"
CATEGORY_BAD_ANNOTATION = "bad annotation"
CATEGORY_BOX_RANGE = "boxes out of range"
CATEGORY_UNSAFE_FILE_NAME = "file_name outside images="
CATEGORY_CONFLICTING_ENTRIES = "conflicting image entries"

# A box coordinate farther than this many image sizes outside the image is not a pixel coordinate
# of it (1e30 is a unit or format mix-up, and overflows the losses): the sample is skipped. Closer,
# the box is kept and the inspection reports it as a warning.
MAX_BOX_IMAGE_SIZES = 4.0


def check_image(image: object, field: str = "image") -> np.ndarray:
    """uint8 (H, W) or (H, W, 3) -> contiguous uint8 (H, W, 3); grayscale is expanded to 3 channels."""
    if not isinstance(image, np.ndarray):
        raise BadSample(f"{field} is {type(image).__name__}, not an array", category=CATEGORY_BAD_IMAGE)
    if image.dtype != np.uint8:
        raise BadSample(f"{field} dtype is {image.dtype}, expected uint8", category=CATEGORY_BAD_IMAGE)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.ndim == 3:
        if image.shape[2] != 3:
            raise BadSample(
                f"{field} has {image.shape[2]} channels (shape {image.shape}), expected 3 or a 2-D grayscale image",
                category=CATEGORY_BAD_IMAGE,
            )
    else:
        raise BadSample(
            f"{field} has rank {image.ndim} (shape {image.shape}), expected (H, W) or (H, W, 3)",
            category=CATEGORY_BAD_IMAGE,
        )
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise BadSample(f"{field} is empty (shape {image.shape})", category=CATEGORY_BAD_IMAGE)
    return np.ascontiguousarray(image)


def check_boxes(boxes: object, field: str = "boxes") -> np.ndarray:
    """(K, 4) real xyxy boxes -> float32 (K, 4). Non-finite or inverted (x2 < x1, y2 < y1) boxes are bad."""
    if not isinstance(boxes, np.ndarray):
        raise BadSample(f"{field} is {type(boxes).__name__}, not an array", category=CATEGORY_BAD_BOXES)
    if boxes.dtype.kind not in "iuf":
        raise BadSample(f"{field} dtype is {boxes.dtype}, expected a real number type", category=CATEGORY_BAD_BOXES)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise BadSample(f"{field} has shape {boxes.shape}, expected (K, 4)", category=CATEGORY_BAD_BOXES)
    finite = np.isfinite(boxes).all(axis=1)
    if not finite.all():
        bad = int((~finite).sum())
        raise BadSample(f"{field} has {bad} non-finite box(es)", category=CATEGORY_NONFINITE_BOXES)
    boxes = boxes.astype(np.float32)
    if not np.isfinite(boxes).all():
        raise BadSample(f"{field} overflows float32", category=CATEGORY_NONFINITE_BOXES)
    inverted = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    if inverted.any():
        first = int(np.flatnonzero(inverted)[0])
        raise BadSample(
            f"{field} has {int(inverted.sum())} inverted box(es) (x2 < x1 or y2 < y1), first {boxes[first].tolist()}",
            category=CATEGORY_INVERTED_BOXES,
        )
    return np.ascontiguousarray(boxes)


def format_box(box) -> str:
    """`[2, 3, 1e+30, 15.5]`: a box's numbers short enough for a one-line message."""
    return "[" + ", ".join(f"{float(value):.6g}" for value in box) + "]"


def check_box_range(boxes: np.ndarray, height: int, width: int, field: str = "boxes") -> np.ndarray:
    """Finite (K, 4) xyxy boxes with every coordinate at most MAX_BOX_IMAGE_SIZES image sizes outside
    the (height, width) image; anything farther raises BadSample naming the first such box."""
    size = np.array([width, height, width, height], dtype=np.float64)
    coords = boxes.astype(np.float64, copy=False)
    far = ((coords < -MAX_BOX_IMAGE_SIZES * size) | (coords > (1.0 + MAX_BOX_IMAGE_SIZES) * size)).any(axis=1)
    if far.any():
        first = int(np.flatnonzero(far)[0])
        raise BadSample(
            f"{field} has {int(far.sum())} box(es) more than {MAX_BOX_IMAGE_SIZES:g} image sizes outside the "
            f"{height}x{width} (HxW) image, first: box {first} {format_box(boxes[first])}",
            category=CATEGORY_BOX_RANGE,
        )
    return boxes


def check_masks(masks: object, count: int, height: int, width: int, field: str = "masks") -> np.ndarray:
    """(K, H, W) binary masks matching the boxes' K and the image's H, W -> bool (K, H, W).

    Integer masks count non-zero as foreground (0/1 and 0/255 are both common); float masks must
    hold only 0 and 1, since anything else is a soft map, not a ground-truth mask.
    """
    if not isinstance(masks, np.ndarray):
        raise BadSample(f"{field} is {type(masks).__name__}, not an array", category=CATEGORY_BAD_MASKS)
    expected = (count, height, width)
    if masks.shape != expected:
        raise BadSample(
            f"{field} has shape {masks.shape}, expected {expected} (K from the boxes, H, W from the image)",
            category=CATEGORY_BAD_MASKS,
        )
    if masks.dtype == np.bool_:
        return np.ascontiguousarray(masks)
    if masks.dtype.kind in "iu":
        return np.ascontiguousarray(masks != 0)
    if masks.dtype.kind == "f":
        if not np.isin(masks, (0.0, 1.0)).all():
            raise BadSample(f"{field} is float with values other than 0 and 1", category=CATEGORY_BAD_MASKS)
        return np.ascontiguousarray(masks != 0)
    raise BadSample(f"{field} dtype is {masks.dtype}, expected bool or integer", category=CATEGORY_BAD_MASKS)
