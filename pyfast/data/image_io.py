"""Decoding image files with Pillow into uint8 (H, W, 3) arrays."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from .sample import BadSample
from .validate import CATEGORY_BAD_IMAGE, CATEGORY_UNREADABLE


def decode_image(data: bytes) -> np.ndarray:
    """Decode an image file's bytes to uint8 (H, W, 3). Grayscale, palette, CMYK and alpha images are
    converted to RGB; high-bit-depth modes are rejected since converting them would clip silently.

    EXIF orientation is not applied: annotations (COCO included) refer to the stored pixel grid.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decode now, so a truncated file fails here and not later
            mode = image.mode
            if mode in ("I", "F") or mode.startswith("I;"):
                raise BadSample(f"unsupported image mode {mode!r} (expected 8-bit)", category=CATEGORY_BAD_IMAGE)
            if mode != "RGB":
                image = image.convert("RGB")
            array = np.asarray(image, dtype=np.uint8)
    except (BadSample, MemoryError):
        raise
    except Exception as error:
        # Pillow raises UnidentifiedImageError, OSError ("image file is truncated"), SyntaxError,
        # DecompressionBombError, ... for damaged files; each means the file cannot be used.
        raise BadSample(f"unreadable image: {type(error).__name__}: {error}", category=CATEGORY_UNREADABLE) from None
    return np.ascontiguousarray(array)
