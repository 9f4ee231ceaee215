"""A folder (searched recursively) of `.npz` samples, single-frame or paired."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Mapping, Optional

import numpy as np

from pyfast.cache.keys import bytes_key

from .compact import PackedStrings
from .sample import BadSample, Sample
from .source import SkipImage, Source, SourcePathError, limit_count
from .validate import (
    CATEGORY_MISSING_KEY,
    CATEGORY_PAIRED,
    CATEGORY_UNREADABLE,
    check_box_range,
    check_boxes,
    check_image,
    check_masks,
)

FRAME_KEYS = ("image", "boxes", "masks")
PAIRED_KEYS = ("image2", "boxes2", "masks2")


def _read_arrays(data: bytes, images: bool = True) -> Mapping[str, np.ndarray]:
    """Decode the arrays a sample needs (without `image`/`image2` when images=False); every decoding
    failure becomes BadSample."""
    try:
        loaded = np.load(io.BytesIO(data), allow_pickle=False)
    except MemoryError:
        raise
    except Exception as error:
        # np.load on a damaged file raises ValueError, OSError, EOFError, BadZipFile, ... depending on
        # where the damage is. Each means "this file is unreadable": exactly what skipping is for.
        raise BadSample(f"unreadable npz file: {type(error).__name__}: {error}", category=CATEGORY_UNREADABLE) from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise BadSample(f"not an npz archive (np.load returned {type(loaded).__name__})", category=CATEGORY_UNREADABLE)
    with loaded:
        names = set(loaded.files)
        missing = [key for key in FRAME_KEYS if key not in names]
        if missing:
            raise BadSample(
                f"missing key(s) {', '.join(repr(key) for key in missing)} (has {sorted(names)})",
                category=CATEGORY_MISSING_KEY,
            )
        paired = [key for key in PAIRED_KEYS if key in names]
        if paired and len(paired) != len(PAIRED_KEYS):
            absent = [key for key in PAIRED_KEYS if key not in names]
            raise BadSample(
                f"paired fields inconsistent: has {', '.join(paired)} but not {', '.join(absent)}",
                category=CATEGORY_PAIRED,
            )
        arrays = {}
        for key in FRAME_KEYS + tuple(paired):
            if not images and key in ("image", "image2"):
                continue
            try:
                arrays[key] = loaded[key]
            except MemoryError:
                raise
            except Exception as error:  # a truncated or corrupt member; see above
                raise BadSample(
                    f"unreadable array {key!r}: {type(error).__name__}: {error}", category=CATEGORY_UNREADABLE
                ) from None
    return arrays


def _check_frame(arrays: Mapping[str, np.ndarray], suffix: str):
    image = check_image(arrays["image" + suffix], "image" + suffix)
    boxes = check_boxes(arrays["boxes" + suffix], "boxes" + suffix)
    check_box_range(boxes, image.shape[0], image.shape[1], "boxes" + suffix)
    masks = check_masks(arrays["masks" + suffix], boxes.shape[0], image.shape[0], image.shape[1], "masks" + suffix)
    return image, boxes, masks


def sample_from_arrays(arrays: Mapping[str, np.ndarray], *, key: str, source: str, file: str) -> Sample:
    """Validate npz-style arrays into a Sample. A paired sample prompts with frame 1's boxes and
    supervises frame 2's boxes and masks on frame 2's image."""
    image, boxes, masks = _check_frame(arrays, "")
    if "image2" not in arrays:
        return Sample(image=image, prompt_boxes=boxes, boxes=boxes.copy(), masks=masks, key=key, source=source, file=file)
    image2, boxes2, masks2 = _check_frame(arrays, "2")
    if boxes2.shape[0] != boxes.shape[0]:
        raise BadSample(
            f"paired fields inconsistent: boxes has {boxes.shape[0]} objects, boxes2 has {boxes2.shape[0]}",
            category=CATEGORY_PAIRED,
        )
    if image2.shape != image.shape:
        # Frame 1's boxes prompt frame 2: they are only meaningful in the same pixel grid.
        raise BadSample(
            f"paired fields inconsistent: image is {image.shape[:2]}, image2 is {image2.shape[:2]}",
            category=CATEGORY_PAIRED,
        )
    return Sample(image=image2, prompt_boxes=boxes, boxes=boxes2, masks=masks2, key=key, source=source, file=file)


def targets_from_arrays(arrays: Mapping[str, np.ndarray], *, key: str, source: str, file: str) -> Sample:
    """A Sample without its image from npz-style arrays that hold no `image`/`image2`. The image
    size is the masks' (the features of this exact file were cached, so its image passed
    `sample_from_arrays` when they were computed)."""
    suffix = "2" if "boxes2" in arrays else ""
    prompts = check_boxes(arrays["boxes"], "boxes")
    boxes = check_boxes(arrays["boxes" + suffix], "boxes" + suffix)
    raw_masks = arrays["masks" + suffix]
    height, width = (raw_masks.shape[1:] if getattr(raw_masks, "ndim", 0) == 3 else (0, 0))
    masks = check_masks(raw_masks, boxes.shape[0], height, width, "masks" + suffix)
    if prompts.shape[0] != boxes.shape[0]:
        raise BadSample(
            f"paired fields inconsistent: boxes has {prompts.shape[0]} objects, boxes2 has {boxes.shape[0]}",
            category=CATEGORY_PAIRED,
        )
    return Sample(image=None, prompt_boxes=prompts, boxes=boxes, masks=masks, key=key,
                  source=source, file=file, image_size=(int(height), int(width)))


class NpzSource(Source):
    """Every `*.npz` under `root`, in sorted relative-path order.

    Each file holds `image` (H, W, 3 or H, W uint8), `boxes` (K, 4 xyxy pixels), `masks` (K, H, W);
    a paired sample adds `image2`, `boxes2`, `masks2` with the same object order. K may be 0.
    """

    kind = "npz"
    loads_without_image = True

    def __init__(self, root, *, max_samples: Optional[int] = None, name: Optional[str] = None):
        root = Path(root)
        if not root.exists():
            raise FileNotFoundError(f"npz source folder {str(root)!r} does not exist")
        if not root.is_dir():
            raise SourcePathError(f"npz source path {str(root)!r} is not a folder; npz:PATH takes a folder of .npz files")
        super().__init__(name or f"npz ({root})")
        self.root = root
        relative = sorted(path.relative_to(root).as_posix() for path in root.rglob("*.npz") if path.is_file())
        relative = relative[: limit_count(len(relative), max_samples)]
        self._files = PackedStrings(relative)

    def __len__(self) -> int:
        return len(self._files)

    def describe(self, index: int) -> str:
        return self._files[self._check_index(index)]

    def load(self, index: int, skip_image: SkipImage = None) -> Sample:
        file = self.describe(index)
        try:
            data = (self.root / file).read_bytes()
        except OSError as error:
            raise BadSample(f"cannot read file: {error.strerror or error}", category=CATEGORY_UNREADABLE) from None
        # The key hashes the bytes we are about to decode: moving or copying the folder keeps it,
        # editing changes it. The file holds the targets too, so it is read either way; a cached
        # sample only skips decoding its image arrays.
        key = bytes_key(data, prefix="npz:")
        if skip_image is not None and skip_image(key):
            return targets_from_arrays(_read_arrays(data, images=False), key=key, source=self.name, file=file)
        arrays = _read_arrays(data)
        return sample_from_arrays(arrays, key=key, source=self.name, file=file)
